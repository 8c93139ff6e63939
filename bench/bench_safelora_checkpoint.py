"""Safe LoRA on a whole checkpoint: wall time and peak RSS of `safeshape project` on a generated Llama-shaped
model (default: the 1.1B-parameter preset, bf16, LoRA r=8 on all seven projections of every layer).

    PYTHONPATH=python python bench/bench_safelora_checkpoint.py [--preset 1b|tiny] [--workdir bench/out]
        [--device cpu|cuda] [--json FILE]

The example is generated once into the workdir (about 4.5 GB on disk for 1b) and reused. `safeshape project`
runs in a child process; its peak RSS is the child's ru_maxrss. For scale, the reference approach holds both
models in memory (2 x params x 2 bytes) plus a d_out x d_out fp32 C per module.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch  # noqa: F401  (the child imports safeshape; import here only to fail early)

    from safeshape.safelora.example import PRESETS, PROJECTIONS

    ex = Path(args.workdir) / f"ckpt-{args.preset}"
    if not (ex / "adapter" / "adapter_config.json").exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "safeshape.safelora.example", str(ex), "--preset", args.preset,
                        "--overwrite"], check=True)
        print(f"generated {ex} in {time.perf_counter() - t:.0f} s")
    p = PRESETS[args.preset]
    kv = p["hidden"] // p["heads"] * p["kv_heads"]
    shapes = [f(p["hidden"], p["intermediate"], kv) for f in PROJECTIONS.values()]
    params = p["layers"] * sum(a * b for a, b in shapes) + 2 * p["vocab"] * p["hidden"]
    ref_bytes = 2 * params * 2 + max(a for a, _ in shapes) ** 2 * 4
    out = ex / "projected"
    cmd = [sys.executable, "-m", "safeshape", "project", "--base", str(ex / "base"), "--aligned", str(ex / "aligned"),
           "--adapter", str(ex / "adapter"), "--out", str(out), "--overwrite", "--device", args.device,
           "--table-rows", "5"]
    t = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (not the generator's)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"safeshape project failed: {cmd}")
    peak_rss = usage.ru_maxrss * 1024
    rep = json.loads((out / "safelora_report.json").read_text())
    res = {"preset": args.preset, "params": params, "modules": rep["totals"]["num_modules"],
           "projected": rep["totals"]["num_projected"], "wall_s": round(wall, 2),
           "peak_rss_bytes": peak_rss, "peak_rss_gib": round(peak_rss / 2**30, 3),
           "reference_min_bytes": ref_bytes, "reference_over_ours_memory": round(ref_bytes / peak_rss, 1),
           "device": args.device, "threads": os.cpu_count()}
    print(f"\n{args.preset}: {params / 1e9:.2f}B params, {res['modules']} modules, wall {wall:.1f} s, "
          f"peak RSS {res['peak_rss_gib']:.2f} GiB (reference needs >= {ref_bytes / 2**30:.1f} GiB: "
          f"{res['reference_over_ours_memory']}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
