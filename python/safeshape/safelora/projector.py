"""The two projectors of `safeshape project --projector` (docs/math.md#safe-lora-orthogonal-projector).

- ``paper``: the published Safe LoRA map ``C = V V^T / ||V||_F`` (through the native op, C never formed). It is
  not a projection: its eigenvalues are ``sigma_i^2 / ||V||_F``, so what it does to an update depends on the
  scale of the weights.
- ``orthogonal``: the orthogonal projection ``P = U_k U_k^T`` onto the top-k left singular subspace of V, with k
  the fewest directions holding ``energy`` of ``||V||_F^2``. Scale-free: P B is B's component in that subspace.
  Two ways to find U_k (``svd``), one module at a time, V V^T never formed:
  ``randomized`` (default): a randomised range finder with subspace iteration (Halko, Martinsson & Tropp 2011,
  algorithms 4.4/5.1: a Gaussian sketch, power steps with QR, the SVD of the small ``Q^T V``) whose width l grows
  until its top k directions hold ``energy`` of ``||V||_F^2`` (computed exactly) with l >= max(2k, k + OVERSAMPLE),
  and iterates until U_k moves by less than ``tol``; when l would pass min(d_out, d_in) / ``EXACT_ABOVE`` (k a large
  share of the rank) it takes the exact SVD instead, which is then as cheap (bench/NOTES.md);
  ``O(d_out d_in l)`` flops a step. A sketch's singular values never exceed V's, so in exact arithmetic k is never
  below the exact one; in float32 it came out one below in two decaying-spectrum cases of bench/bench_svd_cutover.py
  (32 vs 33, 64 vs 65: rounding at the energy boundary, bench/NOTES.md).
  ``exact``: the thin SVD of V in float32 (``O(d_out d_in min(d_out, d_in))`` flops): 95 s for one 4096x4096
  module on the shared 2-core dev box (bench/NOTES.md). tests/test_safelora_projector.py checks one against the other.

The cosine is defined the same way for both: ``cos(P dW, dW)`` with ``dW = B A``, by the float64 Gram form.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..errors import SafeshapeError

PROJECTORS = ("paper", "orthogonal")
SVDS = ("randomized", "exact")
OVERSAMPLE = 10  # spare sketch directions beyond k (Halko et al.'s p)
# the exact SVD once the sketch would be wider than min(d_out, d_in) / EXACT_ABOVE: the randomised path costs about
# one SVD at l ~ d / 4 on a decaying spectrum and l ~ d / 3 on a flat one, 0.2-0.6x of it at d / 8
# (bench/bench_svd_cutover.py, d = 1024-4096, one thread; bench/NOTES.md, issue 25 item "cut-over re-measured")
EXACT_ABOVE = 4


def check_projector(projector: str, energy: float, svd: str = "randomized") -> None:
    if projector not in PROJECTORS:
        raise SafeshapeError(f"--projector must be one of {PROJECTORS}, got {projector!r}")
    if svd not in SVDS:
        raise SafeshapeError(f"--svd must be one of {SVDS}, got {svd!r}")
    if not (isinstance(energy, (int, float)) and math.isfinite(energy) and 0.0 < energy <= 1.0):
        raise SafeshapeError(f"--energy must be a number in (0, 1], got {energy!r}")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading directions whose squared singular values hold ``energy`` of the total (0 when V = 0)."""
    e = singular_values.double() ** 2
    total = e.sum()
    if total == 0:
        return 0
    cum = torch.cumsum(e, 0)
    # a relative slack of 1e-12 so that energy = 1.0 keeps every direction despite rounding in the cumulative sum
    return int(torch.searchsorted(cum, energy * total * (1 - 1e-12)).item()) + 1


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced")[0]


def randomized_energy_basis(v: torch.Tensor, energy: float, seed: int = 0, tol: float = 1e-5,
                            max_iterations: int = 40) -> tuple[torch.Tensor, int]:
    """``(U_k, k)``: the top-k left singular directions of ``v`` holding ``energy`` of ``||v||_F^2``, by randomised
    subspace iteration of adaptive width (see the module doc). Deterministic for a given ``seed`` and device."""
    d_out, d_in = v.shape
    full = min(d_out, d_in)
    total = float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2
    if total == 0 or full == 0:
        return v.new_zeros(d_out, 0), 0
    gen = torch.Generator(device=v.device).manual_seed(seed)

    def sketch(width: int) -> torch.Tensor:
        return v @ torch.randn(d_in, width, generator=gen, device=v.device, dtype=v.dtype)

    width = min(full, 4 * OVERSAMPLE)
    q, prev = _orthonormal(sketch(width)), None
    for _ in range(max_iterations):
        q = _orthonormal(v @ _orthonormal(v.T @ q))  # one power step: directions weighted by sigma^2
        ub, s, _ = torch.linalg.svd(q.T @ v, full_matrices=False)
        captured = torch.cumsum(s.double() ** 2, 0)  # a lower bound of what the top directions of v hold
        k = int(torch.searchsorted(captured, energy * total * (1 - 1e-12)).item()) + 1  # width + 1: not reached
        want = min(full, 2 * width if k > width else max(2 * k, k + OVERSAMPLE))
        if EXACT_ABOVE * want > full:  # k is a large share of the rank: the exact SVD is cheaper than iterating
            u, s, _ = torch.linalg.svd(v, full_matrices=False)
            k = energy_rank(s, energy)
            return u[:, :k], k
        if want > width:  # too narrow to hold k directions with room to converge: widen with fresh columns
            q, prev, width = _orthonormal(torch.cat([q, sketch(want - width)], 1)), None, want
            continue
        k = min(k, width)
        uk = q @ ub[:, :k]
        if width == full:  # q spans the range of v: exact
            return uk, k
        if prev is not None and prev.shape[1] == k and \
                float(torch.linalg.vector_norm(uk - prev @ (prev.T @ uk))) <= tol * math.sqrt(k):
            return uk, k
        prev = uk
    return uk, k


def orthogonal_project(w_aligned: torch.Tensor, w_base: torch.Tensor, lora_b: torch.Tensor,
                       energy: float, svd: str = "randomized") -> tuple[torch.Tensor, float, int]:
    """``(U_k U_k^T B in float32, ||V||_F, k)`` for one module, on the weights' device."""
    v = w_aligned.float() - w_base.float()
    v_norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
    if not math.isfinite(v_norm):
        return torch.full(lora_b.shape, float("nan"), device=v.device), v_norm, 0
    if svd == "exact":
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        k = energy_rank(s, energy)
        uk = u[:, :k]
    else:
        uk, k = randomized_energy_basis(v, energy)
    return uk @ (uk.T @ lora_b.float()), v_norm, k


def project(w_aligned, w_base, lora_a, lora_b, projector: str = "paper",
            energy: float = 0.95, svd: str = "randomized") -> tuple[torch.Tensor, float, float, int | None]:
    """``(B' in float32, cosine, ||V||_F, k or None)`` with the chosen projector; all tensors on one device."""
    b = lora_b.float()
    if projector == "orthogonal":
        projected, v_norm, k = orthogonal_project(w_aligned, w_base, b, energy, svd)
    else:
        projected, v_norm_t = ops.project_lora_b(w_aligned, w_base, b)
        v_norm, k = float(v_norm_t), None
    cosine = float(ops.lora_cosine(b, projected, lora_a))
    return projected, cosine, v_norm, k
