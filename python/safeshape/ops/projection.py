"""Safe LoRA ops (docs/math.md#safe-lora)."""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.safeshape


def project_lora_b(aligned: Tensor, base: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """Project a LoRA ``B`` onto the alignment subspace: ``B' = V (V^T B) / ||V||_F`` with ``V = aligned - base``.

    ``aligned`` and ``base`` are ``[d_out, d_in]`` weights (float32, bfloat16 or float16, same dtype), ``lora_b`` is
    ``[d_out, r]``. ``V^T B`` and ``||V||^2`` are accumulated in float64 (exact products: the cosine stays within
    1e-6 of fp64 even when ``B`` is nearly orthogonal to V's top directions), ``V (V^T B)`` in float32; ``V V^T``
    is never formed and ``V`` is never stored. Non-finite inputs give non-finite outputs.
    Returns ``(projected_b, v_norm)``: ``projected_b`` in ``lora_b``'s dtype, ``v_norm = ||V||_F`` as a float32
    scalar. When ``aligned == base`` (``V = 0``) the projection is defined as zero.
    """
    return _ops.project_lora_b(aligned, base, lora_b)


def lora_cosine(lora_b: Tensor, projected_b: Tensor, lora_a: Tensor) -> Tensor:
    """Cosine between ``C dW`` and ``dW`` (``dW = B A``, ``C dW = B' A``), by the ``r x r`` Gram form in float64.

    Returns a float64 scalar in ``[0, 1]``; 0 when ``dW = 0`` or ``C dW = 0``; NaN when an input is not finite.
    """
    return _ops.lora_cosine(lora_b, projected_b, lora_a)


def alignment_projection_matrix(aligned: Tensor, base: Tensor) -> Tensor:
    """The explicit ``C = V V^T / ||V||_F`` (``d_out x d_out``, float32): costly, for parity checks."""
    return _ops.alignment_projection_matrix(aligned, base)


@torch.library.register_fake("safeshape::project_lora_b")
def _project_lora_b_fake(aligned, base, lora_b):
    torch._check(aligned.dim() == 2 and base.dim() == 2 and lora_b.dim() == 2, lambda: "project_lora_b: 2-D inputs")
    torch._check(lora_b.shape[0] == aligned.shape[0], lambda: "project_lora_b: lora_b rows must equal d_out")
    return (torch.empty_like(lora_b, memory_format=torch.contiguous_format),
            aligned.new_empty((), dtype=torch.float32))


@torch.library.register_fake("safeshape::lora_cosine")
def _lora_cosine_fake(lora_b, projected_b, lora_a):
    return lora_b.new_empty((), dtype=torch.float64)


@torch.library.register_fake("safeshape::alignment_projection_matrix")
def _alignment_projection_matrix_fake(aligned, base):
    d_out = aligned.shape[0]
    return aligned.new_empty((d_out, d_out), dtype=torch.float32)
