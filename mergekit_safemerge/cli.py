"""The ``safemerge`` console script: thin commands around the package's functions.

* ``safemerge scan CONFIG.yml``: rho of every candidate matrix and a threshold sweep, no model;
* ``safemerge demo-models DIR``: write the four tiny demo models (offline);
* ``safemerge report PATH``: print the summary of a ``safemerge_report.json``;
* ``safemerge eval MODEL``: harmfulness, exact-match task accuracy and over-refusal of a model.

Merging itself is done by the stock ``mergekit-yaml`` command.
"""

from __future__ import annotations

import argparse
import sys


def _demo_models(args: argparse.Namespace) -> int:
    from mergekit_safemerge.tiny_models import ARCHITECTURES, build_role_models

    if args.arch not in ARCHITECTURES:
        raise SystemExit(f"safemerge: --arch must be one of {', '.join(ARCHITECTURES)}")
    built = build_role_models(args.out_dir, args.arch, seed=args.seed, num_layers=args.layers)
    for role, path in built.paths.items():
        print(f"{role:<10} {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mergekit_safemerge.report import read_report, terminal_summary

    try:
        report = read_report(args.path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"safemerge: cannot read a report from {args.path}: {error}") from None
    print(terminal_summary(report))
    return 0


def _scan(args: argparse.Namespace) -> int:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_safemerge import METHOD_NAME
    from mergekit_safemerge.errors import SafeMergeError
    from mergekit_safemerge.scan import (
        build_scan,
        measure_candidates,
        plain_targets,
        terminal_sweep,
        terminal_table,
        write_scan,
    )
    from mergekit_safemerge.validation import validate_config

    try:
        with open(args.config, encoding="utf-8") as fp:
            config = MergeConfiguration.model_validate(yaml.safe_load(fp))
        if config.merge_method != METHOD_NAME:
            raise SafeMergeError(
                f"merge_method: scan reads a {METHOD_NAME} configuration, not "
                f"{config.merge_method!r}"
            )
        options = MergeOptions(
            device=args.device,
            lora_merge_cache=args.lora_merge_cache,
            lora_merge_dtype=args.lora_merge_dtype,
            transformers_cache=args.transformers_cache,
            trust_remote_code=args.trust_remote_code,
            quiet=args.quiet,
        )
        checked = validate_config(config, options)
        settings = checked.report_settings(options, config.dtype)
        records = measure_candidates(config, options, targets=plain_targets(settings))
        models = checked.role_sources()
        document = build_scan(records, settings, models)
    except SafeMergeError as error:
        raise SystemExit(f"safemerge scan: {error}") from None
    except (OSError, ValueError) as error:  # unreadable YAML or config
        message = " ".join(str(error).split())
        raise SystemExit(f"safemerge scan: {args.config}: {message}") from None
    paths = write_scan(document, args.out)
    summary = document["summary"]
    print(terminal_table(document))
    print(
        f"select {settings['select']}, threshold {settings['threshold']}: merges "
        f"{summary['merged']} of {summary['changed']} changed matrices "
        f"({summary['candidates']} candidates)"
    )
    print("\nthreshold sweep (merge when rho < tau):")
    print(terminal_sweep(document))
    print("\nwrote " + ", ".join(paths.values()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import os

    from mergekit_safemerge.eval import (
        LlamaGuardJudge,
        PromptSets,
        RefusalPatternJudge,
        evaluate,
        load_model,
        read_records,
        read_task,
        summary_text,
    )

    if not (args.harmful or args.task or args.benign):
        raise SystemExit("safemerge eval: give at least one of --harmful, --task, --benign")
    try:
        sets = PromptSets(
            harmful=[r["prompt"] for r in read_records(args.harmful)][: args.limit]
            if args.harmful
            else [],
            task=read_task(args.task)[: args.limit] if args.task else [],
            benign=[r["prompt"] for r in read_records(args.benign)][: args.limit]
            if args.benign
            else [],
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"safemerge eval: {error}") from None
    refusal = RefusalPatternJudge(args.refusal_pattern) if args.refusal_pattern else None
    if args.judge == "llama-guard":
        if not args.guard_model:
            raise SystemExit("safemerge eval: --judge llama-guard needs --guard-model ID_OR_DIR")
        judge = LlamaGuardJudge(
            args.guard_model,
            device=args.device,
            dtype=args.guard_dtype,
            batch_size=args.batch_size,
            prompt_format=args.guard_prompt,
        )
    else:
        judge = refusal or RefusalPatternJudge()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    result = evaluate(
        model,
        tokenizer,
        sets,
        judge=judge,
        refusal=refusal,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat=not args.no_chat_template,
    )
    result = {"model": args.model, **result}
    result["settings"] = {
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "chat_template": not args.no_chat_template,
        "dtype": args.dtype,
        "judge": args.judge,
        "guard_model": args.guard_model,
        "refusal_patterns": list((refusal or RefusalPatternJudge()).patterns),
    }
    folder = args.model if os.path.isdir(args.model) else "."
    out = args.out or os.path.join(folder, "safemerge_eval.json")
    with open(out, "w", encoding="utf-8") as fp:
        json.dump(result, fp, indent=1)
    print(summary_text(result))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemerge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    scan = commands.add_parser(
        "scan", help="rho of every candidate matrix and a threshold sweep, without merging"
    )
    scan.add_argument("config", help="the safemerge YAML the merge would use")
    scan.add_argument("--out", default="scan", help="folder for scan.json/csv/png (default scan)")
    scan.add_argument("--device", default="cpu", help="cpu, cuda, auto ... (default cpu)")
    scan.add_argument("--lora-merge-cache", default=None, help="as for mergekit-yaml")
    scan.add_argument("--lora-merge-dtype", default=None, help="as for mergekit-yaml")
    scan.add_argument("--transformers-cache", default=None, help="as for mergekit-yaml")
    scan.add_argument("--trust-remote-code", action="store_true")
    scan.add_argument("--quiet", action="store_true", help="no progress bar")
    scan.set_defaults(run=_scan)

    demo = commands.add_parser("demo-models", help="write the four tiny demo models to a folder")
    demo.add_argument("out_dir")
    demo.add_argument("--arch", default="llama", help="llama, qwen2 or gemma2 (default llama)")
    demo.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo_models)

    report = commands.add_parser("report", help="print the summary of a SafeMERGE report")
    report.add_argument("path", help="merged model folder or safemerge_report.json")
    report.set_defaults(run=_report)

    ev = commands.add_parser(
        "eval", help="harmfulness, exact-match task accuracy and over-refusal of a model folder"
    )
    ev.add_argument("model", help="model folder (e.g. a merge output) or hub id")
    ev.add_argument("--harmful", help='harmful requests: JSONL with "prompt", or one a line')
    ev.add_argument("--task", help='task prompts: JSONL of {"prompt", "answer"} (exact match)')
    ev.add_argument("--benign", help="benign requests for over-refusal: JSONL or one a line")
    ev.add_argument(
        "--judge",
        choices=("refusal-pattern", "llama-guard"),
        default="refusal-pattern",
        help="how harmful responses are judged (default refusal-pattern)",
    )
    ev.add_argument("--guard-model", help="Llama-Guard-3 hub id or folder (--judge llama-guard)")
    ev.add_argument(
        "--guard-prompt",
        choices=("builtin", "chat-template"),
        default="builtin",
        help="Llama Guard prompt: built here, or the guard tokenizer's chat template",
    )
    ev.add_argument("--guard-dtype", default="bfloat16", help="dtype of the guard model")
    ev.add_argument(
        "--refusal-pattern",
        action="append",
        help="refusal regex (repeat for several; default: common English refusal openings)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="float32", help="dtype of the evaluated model")
    ev.add_argument(
        "--no-chat-template", action="store_true", help="feed prompts raw, without the template"
    )
    ev.add_argument(
        "--out", help="result JSON (default MODEL/safemerge_eval.json, or ./ for a hub id)"
    )
    ev.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
