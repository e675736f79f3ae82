"""The ``safemerge`` console script: thin commands around the package's functions.

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemerge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

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
