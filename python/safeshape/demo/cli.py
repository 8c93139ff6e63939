"""``safeshape demo``: the toy world end to end, offline, on CPU."""
from __future__ import annotations

import argparse
import json
import sys

from ..io import json_main, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="safeshape-demo",
                        help="folder for models, data, adapters and the report; a rerun skips what is there, "
                             "and more seeds or widths add to it (default: ./safeshape-demo)")
    parser.add_argument("--fast", action="store_true", help="smaller training budgets: about a minute a seed")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", default=None,
                       help="seeds of the world, the models and every run, comma-separated (default: 0); the report "
                            "gives each method's mean and min-max over them")
    seeds.add_argument("--seed", type=int, default=None, help="one seed (the same as --seeds N)")
    parser.add_argument("--widths", default=None,
                        help="hidden sizes of the policy models, comma-separated, e.g. 64,128,256 (default: 64): "
                             "every seed at every width, and a width sweep of V's spread and Safe LoRA's effect")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to this many seeds/widths at once, each in its own process with one torch "
                             "thread (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a work folder made with other settings (--fast) and start again")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are off anyway when stderr is not a terminal)")
    parser.add_argument("--table-from", metavar="REPORT", default=None,
                        help="run nothing: print docs/demo.md's results block (command, machine, ISA, threads, "
                             "seeds, tables) from a demo_report.json")


def _table_from(path: str) -> int:
    from pathlib import Path

    from .report import readme_block

    p = Path(path)
    try:
        report = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"safeshape demo: --table-from {path}: cannot read it as JSON ({exc})", file=sys.stderr)
        return 2
    if not isinstance(report, dict) or report.get("format") != 2 or "summary" not in report:
        print(f"safeshape demo: --table-from {path}: not a demo_report.json of this version (format 2, with a "
              "summary); rerun safeshape demo to make one", file=sys.stderr)
        return 2
    print(readme_block(report), end="")
    return 0


@json_main
def main(args: argparse.Namespace) -> int:
    from ..errors import SafeshapeError
    from .pipeline import Demo, parse_int_list
    from .report import table

    if args.table_from:
        return _table_from(args.table_from)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        seeds = (args.seed,) if args.seed is not None else parse_int_list(args.seeds if args.seeds is not None else "0", "--seeds")
        widths = parse_int_list(args.widths, "--widths") if args.widths else None
        demo = Demo(args.workdir, fast=args.fast, seeds=seeds, widths=widths, progress=not args.no_progress,
                    overwrite=args.overwrite, log=log, jobs=args.jobs)
        report = demo.run()
    except SafeshapeError as exc:
        print(f"safeshape demo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print_json(report, indent=2)
    else:
        print()
        print(table(report))
        plot = f"   plot: {demo.dir / report['plot']}" if report["plot"] else ""
        print(f"\nreport: {demo.dir / 'demo_report.json'}{plot}   ({report['wall_s']:.0f}s)")
    return 0
