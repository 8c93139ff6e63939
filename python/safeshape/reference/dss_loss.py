"""The plain-torch DSS loss (docs/math.md#dss-loss): log_softmax over the whole [N, V] logits, gather, autograd for the
gradients. What the native ops are tested and benchmarked against."""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``log_softmax(logits)[labels]`` in float32 (float64 for float64 logits); 0 at ignored rows."""
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def dss_loss(logits: Tensor, labels: Tensor, weights: Tensor, ref_logprobs: Tensor, kl_coef: float,
             ignore_index: int = -100) -> Tensor:
    """Per-token ``w (-l) + kl_coef (1 - w) 0.5 (l - l_ref)^2``; 0 at ignored rows."""
    dt = _compute_dtype(logits)
    valid = labels != ignore_index
    lp = token_logprobs(logits, labels, ignore_index)
    w, ref = weights.to(dt), ref_logprobs.to(dt)
    loss = w * (-lp) + kl_coef * (1.0 - w) * 0.5 * (lp - ref) ** 2
    return torch.where(valid, loss, 0.0)


def dss_loss_full_kl(logits: Tensor, labels: Tensor, weights: Tensor, ref_logits: Tensor, kl_coef: float,
                     ignore_index: int = -100) -> Tensor:
    """Per-token ``w (-l) + kl_coef (1 - w) KL(softmax(logits) || softmax(ref_logits))``; 0 at ignored rows."""
    dt = _compute_dtype(logits)
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.to(dt), dim=-1)
    logq = torch.log_softmax(ref_logits.to(dt), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    lp = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    w = weights.to(dt)
    return torch.where(valid, w * (-lp) + kl_coef * (1.0 - w) * kl, 0.0)


def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    return token_logprobs(hidden @ weight.T, labels, ignore_index)


def fused_linear_dss_loss(hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor, ref_logprobs: Tensor,
                          kl_coef: float, ignore_index: int = -100) -> Tensor:
    """:func:`dss_loss` of the full ``hidden @ weight.T`` logits (which it materialises)."""
    return dss_loss(hidden @ weight.T, labels, weights, ref_logprobs, kl_coef, ignore_index)
