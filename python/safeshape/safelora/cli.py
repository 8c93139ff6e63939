"""`safeshape project`: Safe LoRA on a PEFT adapter folder."""
from __future__ import annotations

import sys

from ..errors import SafeshapeError
from ..io import json_main, print_json
from .selection import parse_num_layers


def add_arguments(p):
    p.add_argument("--base", required=True, help="unaligned base model: folder (HF, safetensors) or hub id")
    p.add_argument("--aligned", required=True, help="aligned model made from the base: folder or hub id")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter trained on the aligned model: folder or hub id")
    p.add_argument("--out", required=True, help="output adapter folder (refused if it exists, unless --overwrite)")
    p.add_argument("--select", choices=["number", "threshold"], default="number",
                   help="number: project the --num-layers modules of lowest cosine (ties included); "
                        "threshold: project modules with cosine <= --threshold (default: number)")
    p.add_argument("--num-layers", type=parse_num_layers, default=10, metavar="K|F",
                   help="--select number: a count K of modules, or a fraction F in (0, 1) of the adapter's modules "
                        "(ceil(F x modules)); default 10. A warning says when none or more than half are projected")
    p.add_argument("--threshold", type=float, default=0.5, help="tau for --select threshold (default 0.5)")
    p.add_argument("--projector", choices=["paper", "orthogonal"], default="paper",
                   help="paper: C = V V^T / ||V||_F, the published method (default); orthogonal: the orthogonal "
                        "projection onto the top singular directions of V holding --energy of ||V||_F^2")
    p.add_argument("--energy", type=float, default=0.95, help="share of ||V||_F^2 kept by --projector orthogonal "
                                                              "(default 0.95)")
    p.add_argument("--svd", choices=["randomized", "exact"], default="randomized",
                   help="--projector orthogonal: find the top singular directions by a randomised range finder grown "
                        "until they hold --energy (default; seconds for a 4096x4096 module) or by the exact SVD")
    p.add_argument("--cosine-decimals", type=int, default=None, metavar="N",
                   help="round cosines to N decimals before selecting, as the reference code does with N = 5 "
                        "(default: no rounding)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda[:N] "
                                                    "(default auto)")
    p.add_argument("--report", default=None, help="JSON report path (default OUT/safelora_report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --report")
    p.add_argument("--allow-zero-alignment", action="store_true",
                   help="project modules whose base and aligned weights are equal (||V|| = 0, lora_B becomes 0); "
                        "refused by default")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bar (--quiet is the old name)")
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON line on stdout (the table goes to stderr)")
    p.add_argument("--table-rows", type=int, default=20, help="rows of the stdout table (lowest cosine first)")


def print_table(report: dict, rows: int = 20, file=None):
    file = file or sys.stdout  # looked up per call: a default bound at import time could be a closed stream
    mods = sorted(report["modules"], key=lambda m: m["cosine"])
    width = max([len("module")] + [len(m["name"]) for m in mods[:rows]])
    print(f"{'module':<{width}}  {'cosine':>9}  {'||V||_F':>10}  projected", file=file)
    for m in mods[:rows]:
        print(f"{m['name']:<{width}}  {m['cosine']:9.6f}  {m['v_norm']:10.4g}  {'yes' if m['projected'] else 'no'}",
              file=file)
    if len(mods) > rows:
        print(f"... {len(mods) - rows} more modules in the JSON report", file=file)
    t = report["totals"]
    st = report.get("settings", {})
    if st.get("projector") == "orthogonal":
        print(f"projector: orthogonal onto the top singular directions of V holding {st['energy']} of ||V||_F^2",
              file=file)
    else:
        print("projector: paper (C = V V^T / ||V||_F)", file=file)
    print(f"projected {t['num_projected']} of {t['num_modules']} modules "
          f"({100 * t['fraction_projected']:.1f}%), cosine cut {t['cosine_cut']:.6f}, {t['seconds']:.1f} s", file=file)
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)


@json_main
def main(args) -> int:
    from .project import REPORT_NAME, project_adapter

    try:
        report = project_adapter(args.base, args.aligned, args.adapter, args.out, select=args.select,
                                 num_layers=args.num_layers, threshold=args.threshold, device=args.device,
                                 report=args.report, overwrite=args.overwrite, progress=not args.no_progress,
                                 allow_zero_alignment=args.allow_zero_alignment, projector=args.projector,
                                 energy=args.energy, cosine_decimals=args.cosine_decimals, svd=args.svd)
    except SafeshapeError as exc:
        print(f"safeshape project: error: {exc}", file=sys.stderr)
        return 2
    human = sys.stderr if args.json else sys.stdout
    print_table(report, args.table_rows, file=human)
    print(f"wrote {args.out} and {args.report or f'{args.out}/{REPORT_NAME}'}", file=human)
    if args.json:
        print_json(report, sort_keys=True)
    return 0
