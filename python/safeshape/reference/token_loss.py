"""The plain-torch token losses (docs/math.md#dss-loss, docs/math.md#deep-token): log_softmax over the whole [N, V] logits, gather, the
objectives written from the formulas of docs/math.md, autograd for the gradients. What the native ops are tested and
benchmarked against."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``log_softmax(logits)[labels]`` in float32 (float64 for float64 logits); 0 at ignored rows."""
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def deep_token_betas(positions: Tensor, betas: Sequence[float]) -> Tensor:
    """``beta_t = betas[min(t, k) - 1]`` for 1-based positions ``t`` (docs/math.md#deep-token)."""
    table = torch.tensor(list(betas), dtype=torch.float64, device=positions.device)
    return table[(positions.clamp(1, len(betas)) - 1).long()]


def token_objective(logprobs: Tensor, labels: Tensor, objective: str, params: Sequence[float] = (), *,
                    weights: Tensor | None = None, ref_logprobs: Tensor | None = None,
                    positions: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Per-token loss of ``objective`` (``logprob``, ``sft``, ``dss_k2``, ``deep_token``); 0 at ignored rows."""
    l = logprobs
    dt = l.dtype
    w = torch.ones_like(l) if weights is None else weights.to(dt)
    if objective == "logprob":
        loss = w * l
    elif objective == "sft":
        loss = w * -l
    elif objective == "dss_k2":
        kl_coef, *clamp = params  # [kl_coef] or [kl_coef, kl_clamp]
        k2 = 0.5 * (l - ref_logprobs.to(dt)) ** 2
        if clamp:  # OpenRLHF's compute_approx_kl since July 2025 (docs/math.md#dss-kl-clamp): torch's clamp gradient
            k2 = k2.clamp(min=-clamp[0], max=clamp[0])
        loss = w * -l + kl_coef * (1.0 - w) * k2
    elif objective == "deep_token":
        beta = deep_token_betas(positions, params).to(dt)
        loss = w * (2.0 / beta) * -F.logsigmoid(beta * (l - ref_logprobs.to(dt)))
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return torch.where(labels != ignore_index, loss, 0.0)


def full_kl(logits: Tensor, ref_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(l_t, KL(softmax(logits) || softmax(ref_logits)))`` per row; terms with p = 0 add 0; 0 at ignored rows."""
    dt = _compute_dtype(logits)
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.to(dt), dim=-1)
    logq = torch.log_softmax(ref_logits.to(dt), dim=-1)
    p = logp.exp()
    kl = (p * torch.where(p > 0, logp - logq, 0.0)).sum(-1)  # the where inside: no NaN gradient from -inf - -inf
    return token_logprobs(logits, labels, ignore_index), torch.where(valid, kl, 0.0)


def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    return token_logprobs(hidden @ weight.T, labels, ignore_index)


def fused_linear_token_loss(hidden: Tensor, weight: Tensor, labels: Tensor, objective: str,
                            params: Sequence[float] = (), **kw) -> Tensor:
    """:func:`token_objective` of the full ``hidden @ weight.T`` logits (which it materialises)."""
    ignore_index = kw.get("ignore_index", -100)
    return token_objective(token_logprobs(hidden @ weight.T, labels, ignore_index), labels, objective, params, **kw)
