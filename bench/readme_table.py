"""docs/benchmarks.md's projection table, rendered from the JSON that bench/bench_projection.py wrote, never by hand.

    python bench/readme_table.py            # print the table rendered from bench/results/projection_*.json
    python bench/readme_table.py --write    # put it in docs/benchmarks.md between its markers
    python bench/readme_table.py --check    # exit 1 if the page's table differs from the JSON (tests run this)

To refresh it on the machine at hand (about 10 minutes on 2 cores):

    for isa in avx512 avx2; do for t in 1 2; do PYTHONPATH=python python bench/bench_projection.py --threads $t \\
        --isa $isa --repeat 7 --json bench/results/projection_${isa}_t$t.json; done; done
    python bench/readme_table.py --write
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/readme_table.py: begin (generated, do not edit) -->"
END = "<!-- bench/readme_table.py: end -->"
# the table's columns: ((d_out, d_in), r, dtype)
COLUMNS = [((4096, 4096), 8, "float32"), ((4096, 4096), 16, "float32"), ((11008, 4096), 8, "float32"),
           ((11008, 4096), 16, "float32"), ((4096, 4096), 16, "bfloat16"), ((4096, 4096), 64, "float32")]


def load_runs(folder: Path = RESULTS) -> list[list[dict]]:
    runs = []
    for f in sorted(folder.glob("projection_*.json")):
        rows = json.loads(f.read_text())
        if not rows or not isinstance(rows, list):
            raise SystemExit(f"{f}: expected a non-empty list of rows from bench/bench_projection.py --json")
        runs.append(rows)
    return runs


def render(runs: list[list[dict]]) -> str:
    if not runs:
        return "(no results in bench/results/: run bench/bench_projection.py with --json there)"
    machines = sorted({r.get("machine", "unknown machine") for rows in runs for r in rows})
    dates = sorted({r.get("date", "?") for rows in runs for r in rows})
    head = ["code path", "threads"] + [f"{d_out}x{d_in} r={r}{'' if dt == 'float32' else ' ' + dt}"
                                       for (d_out, d_in), r, dt in COLUMNS] + ["reference / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for rows in sorted(runs, key=lambda rows: (rows[0].get("cpu_isa") != "avx512", rows[0]["threads"])):
        cells = [str(rows[0].get("cpu_isa")), str(rows[0]["threads"])]
        for (d_out, d_in), r, dt in COLUMNS:
            hit = [x for x in rows if (x["d_out"], x["d_in"], x["r"], x["dtype"]) == (d_out, d_in, r, dt)]
            if not hit:
                cells.append("-")
                continue
            x = hit[0]
            fma = f", {x['ours_over_compute']:.2f}x fma" if x.get("ours_over_compute") else ""
            cells.append(f"{x['ours_over_floor']:.2f}x{fma}")
        speedups = [x["reference_over_ours"] for x in rows if x.get("reference_over_ours")]
        cells.append(f"{min(speedups):.0f}-{max(speedups):.0f}x" if speedups else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"project_lora_b, ours / one read of both weights (the floor) and ours / the arithmetic alone at this path's "
        f"measured FMA rate (`fma`); {', '.join(machines)}; runs started {dates[0]} to {dates[-1]}; "
        "`bench/bench_projection.py --repeat 7`, JSON in bench/results/:",
        "",
        *lines,
    ])


def table_block(text: str) -> tuple[int, int]:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{PAGE}: the markers {BEGIN!r} and {END!r} are missing")
    start = text.index(BEGIN) + len(BEGIN)
    return start, text.index(END, start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="replace the table in docs/benchmarks.md")
    g.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md's table is not the rendered one")
    args = ap.parse_args(argv)
    table = render(load_runs())
    if not (args.write or args.check):
        print(table)
        return 0
    text = PAGE.read_text()
    start, end = table_block(text)
    want = "\n" + table + "\n"
    if args.check:
        if text[start:end] != want:
            print("docs/benchmarks.md's projection table differs from bench/results/*.json: run "
                  "python bench/readme_table.py --write", file=sys.stderr)
            return 1
        return 0
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text(text[:start] + want + text[end:])
    tmp.replace(PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
