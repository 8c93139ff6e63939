"""The two projectors of `safeshape project --projector` (docs/math.md#safe-lora-orthogonal-projector).

- ``paper``: the published Safe LoRA map ``C = V V^T / ||V||_F`` (through the native op, C never formed). It is
  not a projection: its eigenvalues are ``sigma_i^2 / ||V||_F``, so what it does to an update depends on the
  scale of the weights.
- ``orthogonal``: the orthogonal projection ``P = U_k U_k^T`` onto the top-k left singular subspace of V, with k
  the fewest directions holding ``energy`` of ``||V||_F^2``. Scale-free: P B is B's component in that subspace.
  Computed from the thin SVD of this one module's ``d_out x d_in`` V in float32 (``O(d_out d_in min(d_out,
  d_in))`` flops, ``(d_out + d_in) min(d_out, d_in)`` floats; V V^T is never formed), one module at a time.
  Exact but slow on a CPU: 95 s for one 4096x4096 module on the shared 2-core dev box (bench/NOTES.md); a
  randomised range finder (top singular directions until the energy is reached) would be the faster route.

The cosine is defined the same way for both: ``cos(P dW, dW)`` with ``dW = B A``, by the float64 Gram form.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..errors import SafeshapeError

PROJECTORS = ("paper", "orthogonal")


def check_projector(projector: str, energy: float) -> None:
    if projector not in PROJECTORS:
        raise SafeshapeError(f"--projector must be one of {PROJECTORS}, got {projector!r}")
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


def orthogonal_project(w_aligned: torch.Tensor, w_base: torch.Tensor, lora_b: torch.Tensor,
                       energy: float) -> tuple[torch.Tensor, float, int]:
    """``(U_k U_k^T B in float32, ||V||_F, k)`` for one module, on the weights' device."""
    v = w_aligned.float() - w_base.float()
    v_norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
    if not math.isfinite(v_norm):
        return torch.full(lora_b.shape, float("nan"), device=v.device), v_norm, 0
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    k = energy_rank(s, energy)
    uk = u[:, :k]
    return uk @ (uk.T @ lora_b.float()), v_norm, k


def project(w_aligned, w_base, lora_a, lora_b, projector: str = "paper",
            energy: float = 0.95) -> tuple[torch.Tensor, float, float, int | None]:
    """``(B' in float32, cosine, ||V||_F, k or None)`` with the chosen projector; all tensors on one device."""
    b = lora_b.float()
    if projector == "orthogonal":
        projected, v_norm, k = orthogonal_project(w_aligned, w_base, b, energy)
    else:
        projected, v_norm_t = ops.project_lora_b(w_aligned, w_base, b)
        v_norm, k = float(v_norm_t), None
    cosine = float(ops.lora_cosine(b, projected, lora_a))
    return projected, cosine, v_norm, k
