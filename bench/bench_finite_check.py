"""Cost of refusing NaN/Inf weights in Safe LoRA (issue 10): safeshape.safelora.checkpoint.check_finite (one sum
pass) vs the plain element-wise test, next to the projection of the same module. Interleaved, ratios printed.

    PYTHONPATH=python python bench/bench_finite_check.py [--size 4096] [--rank 16] [--repeats 5]
"""
import argparse
import time

import torch

from safeshape.safelora.checkpoint import check_finite
from safeshape.safelora.project import project_module


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    n, r = args.size, args.rank
    for dtype in (torch.float32, torch.bfloat16):
        wb = torch.randn(n, n).to(dtype)
        wa = (wb.float() + 0.01 * torch.randn(n, n)).to(dtype)
        a, b = torch.randn(r, n), torch.randn(n, r)
        ours, plain, proj = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            check_finite(wb, "base")
            check_finite(wa, "aligned")
            t1 = time.perf_counter()
            assert bool(torch.isfinite(wb).all()) and bool(torch.isfinite(wa).all())
            t2 = time.perf_counter()
            project_module(wb, wa, a, b, "cpu")
            t3 = time.perf_counter()
            ours.append(t1 - t0)
            plain.append(t2 - t1)
            proj.append(t3 - t2)
        o, pl, pr = min(ours), min(plain), min(proj)
        print(f"{n}x{n} {str(dtype)[6:]:>8} r={r}: check_finite x2 {o * 1e3:7.2f} ms, isfinite().all() x2 "
              f"{pl * 1e3:7.2f} ms, project_module {pr * 1e3:7.2f} ms; check/projection {o / pr:.3f}, "
              f"plain/projection {pl / pr:.3f}")


if __name__ == "__main__":
    main()
