"""The ``safemerge`` console script: thin commands around the package's functions.

* ``safemerge scan CONFIG.yml``: rho of every candidate matrix and a threshold sweep, no model;
* ``safemerge demo-models DIR``: write the four tiny demo models (offline);
* ``safemerge report PATH``: print the summary of a ``safemerge_report.json``.

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
