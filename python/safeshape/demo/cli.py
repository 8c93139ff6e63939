"""``safeshape demo``: the toy world end to end, offline, on CPU."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="safeshape-demo",
                        help="folder for models, data, adapters and the report; a rerun skips what is there "
                             "(default: ./safeshape-demo)")
    parser.add_argument("--fast", action="store_true", help="smaller training budgets: about two minutes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the models and every run")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a work folder made with other settings (--fast/--seed) and start again")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from ..errors import SafeshapeError
    from .pipeline import Demo
    from .report import table

    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        demo = Demo(args.workdir, fast=args.fast, seed=args.seed, progress=not args.no_progress,
                    overwrite=args.overwrite, log=log)
        report = demo.run()
    except SafeshapeError as exc:
        print(f"safeshape demo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print()
        print(table(report))
        plot = f"   plot: {demo.dir / report['plot']}" if report["plot"] else ""
        print(f"\nreport: {demo.dir / 'demo_report.json'}{plot}   ({report['wall_s']:.0f}s)")
    return 0
