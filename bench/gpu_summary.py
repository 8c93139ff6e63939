"""Compact summary of bench/gpu_check.sh's output folder: test counts, and every ratio the benches wrote.

    python bench/gpu_summary.py bench/out/gpu
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(folder: str) -> None:
    out = Path(folder)
    log = out / "tests_full.log"
    if log.exists():
        text = log.read_text(errors="replace")
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", text)
        print("tests:", ", ".join(f"{n} {what}" for n, what in counts) or "no pytest summary (timed out?)")
        for line in text.splitlines():
            if line.startswith(("FAILED", "ERROR")):
                print("  " + line[:160])
    proj = out / "projection.json"
    if proj.exists():
        print("project_lora_b (ours / two reads of both weights at the HBM floor; 1.0 = the floor):")
        for r in json.loads(proj.read_text()):
            ratio = r.get("ours_over_two_reads_at_hbm")
            print(f"  {r['d_out']}x{r['d_in']} r={r['r']} {r['dtype']}: {r['ours_s'] * 1e3:.3f} ms"
                  + (f", {ratio:.2f}x the floor" if ratio else ""))
    for f in sorted(out.glob("*.json")):
        if f.name == "projection.json":
            continue
        try:
            rows = json.loads(f.read_text())
        except ValueError:
            print(f"{f.name}: unreadable")
            continue
        rows = rows if isinstance(rows, list) else rows.get("rows", [rows])
        print(f"{f.stem}:")
        for r in rows[:24]:
            if not isinstance(r, dict):
                continue
            keep = {k: v for k, v in r.items() if isinstance(v, (str, int)) and not isinstance(v, bool)
                    or re.search(r"ratio|over|_x|speedup|_s$|ms", k)}
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/out/gpu")
