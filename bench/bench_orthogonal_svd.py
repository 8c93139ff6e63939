"""`--projector orthogonal`: U_k by the randomised range finder (--svd randomized, the default) vs the exact SVD
(--svd exact) on one module, in one run: seconds, k, and how far the randomised projection is from the exact one.

V = U diag(sigma) W^T with random orthonormal U, W and a chosen spectrum (a real alignment delta's spectrum
decides k, and k decides the randomised cost: O(d^2 k) a step against the SVD's O(d^3)).

    PYTHONPATH=python python bench/bench_orthogonal_svd.py [--size 4096] [--energy 0.95] [--spectra power1,exp,power05]
"""
import argparse
import time

import torch

from safeshape.safelora.projector import orthogonal_project

SPECTRA = {  # sigma_i, i = 0..d-1
    "power1": lambda i: 1.0 / (i + 1.0),          # energy in a few directions
    "exp": lambda i: torch.exp(-i / 200.0),       # k in the hundreds
    "power05": lambda i: 1.0 / (i + 1.0) ** 0.5,  # nearly flat: most directions needed
}


def module(d: int, spectrum: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    w, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    sigma = SPECTRA[spectrum](torch.arange(d, dtype=torch.float32))
    return (u * sigma) @ w.T, torch.randn(d, 16, generator=g)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--energy", type=float, default=0.95)
    p.add_argument("--spectra", default=",".join(SPECTRA))
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.size}x{args.size}, energy {args.energy}")
    print(f"{'spectrum':>8}  {'k exact':>7}  {'k rand':>6}  {'exact s':>8}  {'rand s':>7}  {'exact/rand':>10}  "
          f"{'|PB-P*B|/|P*B|':>14}")
    for name in args.spectra.split(","):
        v, b = module(args.size, name)
        zero = torch.zeros_like(v)
        t0 = time.perf_counter()
        exact, _, k_exact = orthogonal_project(v, zero, b, args.energy, svd="exact")
        t1 = time.perf_counter()
        rand, _, k_rand = orthogonal_project(v, zero, b, args.energy, svd="randomized")
        t2 = time.perf_counter()
        err = float((rand.double() - exact.double()).norm() / exact.double().norm())
        print(f"{name:>8}  {k_exact:7d}  {k_rand:6d}  {t1 - t0:8.1f}  {t2 - t1:7.2f}  {(t1 - t0) / (t2 - t1):10.1f}  "
              f"{err:14.2e}")


if __name__ == "__main__":
    main()
