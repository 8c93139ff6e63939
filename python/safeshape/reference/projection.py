"""The reference Safe LoRA way: form C = V V^T / ||V||_F explicitly (docs/math.md#safe-lora-projection)."""
from __future__ import annotations

import torch
from torch import Tensor


def alignment_projection_matrix(aligned: Tensor, base: Tensor, compute_dtype=torch.float32) -> Tensor:
    v = aligned.to(compute_dtype) - base.to(compute_dtype)
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        return torch.zeros(v.shape[0], v.shape[0], dtype=compute_dtype, device=v.device)
    return (v @ v.T) / norm


def project_lora_b(aligned: Tensor, base: Tensor, lora_b: Tensor, compute_dtype=torch.float32):
    """``(C B, ||V||_F)`` with C formed explicitly; ``projected_b`` in ``lora_b``'s dtype, norm float32."""
    c = alignment_projection_matrix(aligned, base, compute_dtype)
    norm = torch.linalg.vector_norm(aligned.to(compute_dtype) - base.to(compute_dtype))
    return (c @ lora_b.to(compute_dtype)).to(lora_b.dtype), norm.to(torch.float32)


def lora_cosine(lora_b: Tensor, projected_b: Tensor, lora_a: Tensor, compute_dtype=torch.float64) -> Tensor:
    """``<C dW, dW>_F / (||C dW||_F ||dW||_F)`` from the full ``d_out x d_in`` products; 0 when either is 0."""
    a = lora_a.to(compute_dtype)
    dw = lora_b.to(compute_dtype) @ a
    cdw = projected_b.to(compute_dtype) @ a
    den = torch.linalg.vector_norm(cdw) * torch.linalg.vector_norm(dw)
    if den == 0:
        return torch.zeros((), dtype=torch.float64, device=dw.device)
    return ((cdw * dw).sum() / den).to(torch.float64)
