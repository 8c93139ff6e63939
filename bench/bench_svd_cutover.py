"""Where `--svd randomized` should hand over to the exact SVD (safeshape.safelora.projector.EXACT_ABOVE): the
randomised range finder with the cut-over switched off vs the exact SVD, on modules whose 95%-energy rank k is set,
in one run, at the widths l = max(2k, k + 10) around the cut-over l = min(d)/EXACT_ABOVE. Times are CPU seconds of
this process (time.process_time: the shared box's load inflates wall time, less so CPU time) and wall seconds.

V = U diag(sigma) W^T (random orthonormal U, W), sigma chosen so that k = the target:
  flat:  sigma_i = 1 - 0.5 i / r for i < r (r just above k; a gentle slope, no repeated values), then 0.01 falling
         to 0.005 (LAPACK's SVD fails to converge on a long run of equal values)
  decay: sigma_i = exp(-i / tau), tau = 2 k / ln 20 (95% of the energy in the first k)

    PYTHONPATH=python OMP_NUM_THREADS=1 python bench/bench_svd_cutover.py [--sizes 1024,2048] [--fractions 32,16,8]
        [--energy 0.95] [--repeat 2]

One thread on a loaded box: CPU seconds then count work, not other processes' time (spinning BLAS threads would).
"""
import argparse
import math
import os
import time

import torch

from safeshape.safelora import projector


def spectrum(kind: str, d: int, k: int) -> torch.Tensor:
    i = torch.arange(d, dtype=torch.float64)
    if kind == "decay":
        return torch.exp(-i / (2 * k / math.log(20.0)))
    # flat: find r whose 95% rank is k (the slope makes the energy of the first j directions a cubic in j)
    for r in range(k, d + 1):
        s = torch.where(i < r, 1 - 0.5 * i / r, 0.01 - 0.005 * (i - r) / d)
        if projector.energy_rank(s, 0.95) >= k:
            return s
    return s


def module(d: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    w, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (u * sigma.float()) @ w.T


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--fractions", default="32,16,8", help="k = d / fraction (width l = 2k = d / (fraction / 2))")
    p.add_argument("--spectra", default="flat,decay")
    p.add_argument("--energy", type=float, default=0.95)
    p.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest is printed")
    args = p.parse_args()
    projector.EXACT_ABOVE = 0  # the randomised path however wide it gets (the test is EXACT_ABOVE * l > min(d))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, energy {args.energy}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'d':>5} {'spectrum':>8} {'k':>5} {'l':>5} {'l/d':>6} {'k rand':>6} {'exact c':>8} {'rand c':>8} "
          f"{'rand/exact':>10} {'exact w':>7} {'rand w':>7} {'load':>5}  (c: CPU s, w: wall s)")
    for d in (int(x) for x in args.sizes.split(",")):
        for kind in args.spectra.split(","):
            for frac in (int(x) for x in args.fractions.split(",")):
                k = d // frac
                v = module(d, spectrum(kind, d, k))
                ce = cr = we = wr = math.inf
                for _ in range(args.repeat):  # alternating, so a burst of load hits both
                    c0, t0 = time.process_time(), time.perf_counter()
                    _, s, _ = torch.linalg.svd(v, full_matrices=False)
                    k_exact = projector.energy_rank(s, args.energy)
                    c1, t1 = time.process_time(), time.perf_counter()
                    _, k_rand = projector.randomized_energy_basis(v, args.energy)
                    c2, t2 = time.process_time(), time.perf_counter()
                    ce, cr, we, wr = min(ce, c1 - c0), min(cr, c2 - c1), min(we, t1 - t0), min(wr, t2 - t1)
                l = min(d, max(2 * k_exact, k_exact + projector.OVERSAMPLE))
                print(f"{d:5d} {kind:>8} {k_exact:5d} {l:5d} {l / d:6.3f} {k_rand:6d} {ce:8.2f} {cr:8.2f} "
                      f"{cr / ce:10.2f} {we:7.1f} {wr:7.1f} {os.getloadavg()[0]:5.1f}", flush=True)


if __name__ == "__main__":
    main()
