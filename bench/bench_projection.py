"""Per-module Safe LoRA projection cost: our op vs the reference formula (forming C) vs one read of both weights.

Prints a table and writes JSON (--json). Ratios are measured in one run on the same machine, so they are what to
compare; absolute times on shared 2-core machines are noisy.

    PYTHONPATH=python python bench/bench_projection.py [--device cpu|cuda] [--quick] [--isa avx2] [--json out.json]

The CPU code path (avx512 / avx2 / generic) is printed; --isa forces one (same as the environment variable
SAFESHAPE_ISA), so both paths can be measured on one AVX-512 machine.

Bounds on CPU: `floor` is one read of both weights; `fma ms` is the arithmetic alone, d_out * d_in * r FMAs in
float64 (pass 1, V^T B) and as many in float32 (pass 2), at this code path's FMA rate measured on registers
(safeshape._native.cpu_fma_rate) times the threads; `ours/bound` divides by the larger of the two. With the
environment variable SAFESHAPE_PROFILE=1 each call prints its two passes' times to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if "--isa" in sys.argv:  # must be in the environment before the native library picks its path
    os.environ["SAFESHAPE_ISA"] = sys.argv[sys.argv.index("--isa") + 1]

import torch  # noqa: E402

import safeshape  # noqa: E402
from safeshape import _native, ops, reference  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timeit(fn, device, repeat, clock=time.perf_counter):
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t)
    return statistics.median(times)


def read_floor(aligned, base):
    # one read of both weights: the least any method must do. An integer max over the same bytes is
    # memory bound for every dtype (torch's bf16 float sum is not: it would flatter bf16 ratios).
    return aligned.view(torch.int32).max(), base.view(torch.int32).max()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="only 4096x4096, r=16, fp32")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) explicit-C reference")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--isa", choices=["avx512", "avx2", "generic"], default=None,
                    help="force the CPU code path (default: the widest this CPU has)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: this thread's CPU time (with --threads 1 the op runs on the calling thread), which "
                         "time slices taken by other jobs on a shared machine do not inflate")
    ap.add_argument("--json", default=None)
    ap.add_argument("--hbm-gbps", type=float, default=None,
                    help="GPU memory bandwidth (GB/s); adds ours / (time to read both weights twice at that speed)")
    args = ap.parse_args(argv)
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (dev != "cpu" or torch.get_num_threads() != 1):
        ap.error("--clock thread needs --device cpu --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    ranks = [16] if args.quick else [8, 16, 64]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows = []
    isa = safeshape.build_info()["cpu_isa"]
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs" if dev == "cpu" else torch.cuda.get_device_name()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"device={dev} threads={torch.get_num_threads()} clock={args.clock} cpu_isa={isa} cpu={cpu_model()!r} "
          f"load={os.getloadavg()[0]:.2f} torch={torch.__version__}")
    rate = None
    if dev == "cpu":
        # The compute bound: pass 1's float64 FMAs (the precision docs/math.md asks of V^T B) and pass 2's float32
        # ones, d_out * d_in * r each, at this code path's measured FMA rate on every thread.
        rate = _native.cpu_fma_rate(0.05)
        print(f"fma_rate_per_thread: float64 {rate['float64'] / 1e9:.1f} G/s, float32 {rate['float32'] / 1e9:.1f} G/s "
              "(register-only, this code path)")
    print(f"{'shape':>12} {'r':>3} {'dtype':>9} {'ours ms':>9} {'ref ms':>9} {'floor ms':>9} "
          f"{'ref/ours':>9} {'ours/floor':>10}"
          + (f" {'fma ms':>8} {'ours/fma':>8} {'ours/bound':>10}" if rate else ""))
    g = torch.Generator().manual_seed(0)
    for d_out, d_in in shapes:
        for dtype in dtypes:
            base = torch.randn(d_out, d_in, generator=g).to(dtype).to(dev)
            aligned = (base.float() + 0.01 * torch.randn(d_out, d_in, generator=g)).to(dtype).to(dev)
            for r in ranks:
                b = (0.01 * torch.randn(d_out, r, generator=g)).to(dtype).to(dev)
                ops.project_lora_b(aligned, base, b)  # warm-up
                # the floor and ours alternate, so that both see the same machine (on a shared VM the memory
                # bandwidth drifts between runs: the 2-thread floor measured 2.3-3.2 ms at 4096^2 fp32)
                floors, ours_times = [], []
                for _ in range(args.repeat):
                    floors.append(timeit(lambda: read_floor(aligned, base), dev, 1, clock))
                    ours_times.append(timeit(lambda: ops.project_lora_b(aligned, base, b), dev, 1, clock))
                floor, ours = statistics.median(floors), statistics.median(ours_times)
                ref = None
                # the reference's cost does not depend on r (forming C dominates): time it once per shape/dtype
                if not args.no_reference and r == ranks[0]:
                    ref = timeit(lambda: reference.project_lora_b(aligned, base, b), dev, 1 if dev == "cpu" else 3,
                                 clock)
                    ref_cache = ref
                elif not args.no_reference:
                    ref = ref_cache
                row = dict(d_out=d_out, d_in=d_in, r=r, dtype=str(dtype).replace("torch.", ""), device=dev,
                           cpu_isa=isa if dev == "cpu" else None, threads=torch.get_num_threads(), clock=args.clock,
                           ours_s=ours, reference_s=ref, floor_s=floor,
                           reference_over_ours=(ref / ours) if ref else None, ours_over_floor=ours / floor,
                           machine=machine, torch=torch.__version__, load=os.getloadavg()[0], date=date)
                if rate:
                    fmas = d_out * d_in * r
                    compute = fmas * (1 / rate["float64"] + 1 / rate["float32"]) / torch.get_num_threads()
                    row.update(compute_bound_s=compute, ours_over_compute=ours / compute,
                               ours_over_bound=ours / max(floor, compute))
                if args.hbm_gbps:
                    two_reads = 2 * 2 * aligned.numel() * aligned.element_size() / (args.hbm_gbps * 1e9)
                    row["ours_over_two_reads_at_hbm"] = ours / two_reads
                rows.append(row)
                print(f"{d_out:>5}x{d_in:<6} {r:>3} {row['dtype']:>9} {ours*1e3:9.2f} "
                      f"{(ref or float('nan'))*1e3:9.1f} {floor*1e3:9.2f} "
                      f"{(row['reference_over_ours'] or float('nan')):9.1f} {row['ours_over_floor']:10.2f}"
                      + (f" {row['compute_bound_s'] * 1e3:8.2f} {row['ours_over_compute']:8.2f}"
                         f" {row['ours_over_bound']:10.2f}" if rate else "")
                      + (f" {row['ours_over_two_reads_at_hbm']:8.2f}x of 2 reads at HBM" if args.hbm_gbps else ""))
            del base, aligned
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
