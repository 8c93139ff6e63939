"""The DSS training loss (docs/math.md#dss-loss) as a module: what the trainer minimises on every step.

    loss = (1 / N) * sum_t [ w_t * (-l_t) + kl_coef * (1 - w_t) * 0.5 * (l_t - l_ref_t)^2 ]

over the valid (label != ignore_index) tokens t. N is the number of valid tokens of this call, or, under gradient
accumulation, ``num_items_in_batch``: the valid tokens of the whole optimizer step (as transformers passes it), so
that k micro-batches accumulate exactly the gradient of one big batch.

Special cases, all just weights tensors:

- SFT: ``weights = sft_weights(labels)`` (all 1) and ``kl_coef = 0``: the usual mean token cross-entropy.
- Rejection sampling (RS): ``weights = rs_weights(labels, keep)`` (per-example 0/1, broadcast over the example's
  tokens) and ``kl_coef = 0``: cross-entropy over the kept examples, still divided by all valid tokens.
- DSS: per-token STAR weights in [0, 1] and ``kl_coef > 0`` (default 0.5) with the reference log-probabilities.

Labels must already be aligned with the rows (the caller shifts them for next-token prediction).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops


@dataclass
class DSSLossOutput:
    """``loss``: differentiable scalar, ``sum of per-token losses / normaliser``. ``sft_loss`` and ``kl_loss``:
    detached scalars with the same normaliser, ``sft_loss + kl_loss == loss``. ``num_tokens``: valid tokens in this
    call. ``mean_weight``: detached mean STAR weight over the valid tokens (0 when there are none)."""

    loss: Tensor
    sft_loss: Tensor
    kl_loss: Tensor
    num_tokens: int
    mean_weight: Tensor


def sft_weights(labels: Tensor) -> Tensor:
    """Weights for plain SFT: 1 for every token (use with ``kl_coef = 0``)."""
    return torch.ones(labels.shape, dtype=torch.float32, device=labels.device)


def rs_weights(labels: Tensor, keep: Tensor) -> Tensor:
    """Per-token weights for rejection sampling: ``keep [B]`` (bool or 0/1) broadcast over ``labels [B, T]``."""
    if keep.dim() != 1 or labels.dim() < 1 or keep.shape[0] != labels.shape[0]:
        raise ValueError(f"rs_weights: keep must have shape [{labels.shape[0] if labels.dim() else '?'}] (one value "
                         f"per example of labels {tuple(labels.shape)}), got {tuple(keep.shape)}")
    w = keep.to(device=labels.device, dtype=torch.float32)
    return w.reshape(-1, *([1] * (labels.dim() - 1))).expand(labels.shape).contiguous()


class DSSLoss(nn.Module):
    """DSS loss over policy logits (``fused=False``) or over hidden states and the lm-head weight (``fused=True``,
    the ``[tokens, vocab]`` logits never exist in full).

    ``kl="k2"``: the KL term is the k2 estimator at the data token (needs ``ref_logprobs``, e.g. from
    :func:`safeshape.ops.token_logprobs` or :func:`safeshape.ops.fused_linear_token_logprobs` on the reference
    model under ``torch.no_grad()``; not needed when ``kl_coef = 0``). ``kl="full"``: the full-vocabulary
    ``KL(p_theta || p_ref)`` against ``ref_logits``; it needs ``fused=False``.
    """

    def __init__(self, kl_coef: float = 0.5, kl: str = "k2", fused: bool = True, ignore_index: int = -100,
                 chunk_rows: int = 0):
        super().__init__()
        if kl not in ("k2", "full"):
            raise ValueError(f"DSSLoss: kl must be 'k2' or 'full', got {kl!r}")
        if kl == "full" and fused:
            raise ValueError("DSSLoss: kl='full' needs the reference logits [tokens, vocab] and works only with "
                             "fused=False")
        if kl_coef < 0:
            raise ValueError(f"DSSLoss: kl_coef must be >= 0, got {kl_coef}")
        self.kl_coef, self.kl, self.fused = float(kl_coef), kl, fused
        self.ignore_index, self.chunk_rows = ignore_index, chunk_rows

    def extra_repr(self) -> str:
        return f"kl_coef={self.kl_coef}, kl={self.kl!r}, fused={self.fused}, ignore_index={self.ignore_index}"

    def forward(self, *, labels: Tensor, weights: Tensor, ref_logprobs: Tensor | None = None,
                logits: Tensor | None = None, hidden: Tensor | None = None, lm_head_weight: Tensor | None = None,
                ref_logits: Tensor | None = None, num_items_in_batch: int | Tensor | None = None) -> DSSLossOutput:
        labels = labels.reshape(-1)
        n = labels.shape[0]
        if weights.numel() != n:
            raise ValueError(f"DSSLoss: weights has {weights.numel()} elements but labels has {n} (one weight per "
                             "token; for per-example weights use rs_weights)")
        weights = weights.reshape(-1)
        valid = labels != self.ignore_index
        num_tokens = int(valid.sum().item())
        if num_items_in_batch is None:
            denom = max(num_tokens, 1)
        else:
            # a step with no valid token at all gives loss 0 (as the num_items_in_batch=None path does), not 0/0
            denom = num_items_in_batch
            if isinstance(denom, Tensor):
                denom = denom.to(device=labels.device, dtype=torch.float32).clamp_min(1)
            else:
                if denom < 0:
                    raise ValueError(f"DSSLoss: num_items_in_batch must be >= 0, got {denom}")
                denom = max(denom, 1)

        if self.kl == "full":
            if logits is None or ref_logits is None:
                raise ValueError("DSSLoss(kl='full'): pass logits and ref_logits")
            v = logits.shape[-1]
            per_token, logprobs, kl_rows = ops.dss_loss_full_kl_and_parts(
                logits.reshape(-1, v), labels, weights, ref_logits.reshape(-1, v), self.kl_coef, self.ignore_index)
            kl_part = self.kl_coef * (1.0 - weights.to(kl_rows.dtype)) * kl_rows
            total = per_token.sum()
        else:
            ref = self._ref_logprobs(ref_logprobs, n, labels.device)
            if self.fused:
                if hidden is None or lm_head_weight is None:
                    raise ValueError("DSSLoss(fused=True): pass hidden and lm_head_weight (or build it with "
                                     "fused=False and pass logits)")
                total, per_token, logprobs = ops.fused_linear_dss_loss_sum(
                    hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, labels, weights, ref, self.kl_coef,
                    self.ignore_index, chunk_rows=self.chunk_rows)
            else:
                if logits is None:
                    raise ValueError("DSSLoss(fused=False): pass logits")
                per_token, logprobs = ops.dss_loss_and_logprobs(logits.reshape(-1, logits.shape[-1]), labels, weights,
                                                                ref, self.kl_coef, self.ignore_index)
                total = per_token.sum()
            d = logprobs - ref.to(logprobs.dtype)
            kl_part = self.kl_coef * (1.0 - weights.to(d.dtype)) * 0.5 * d * d

        with torch.no_grad():
            w = weights.to(logprobs.dtype)
            sft = torch.where(valid, w * -logprobs, 0.0).sum() / denom
            kl_loss = torch.where(valid, kl_part, 0.0).sum() / denom
            mean_weight = torch.where(valid, w, 0.0).sum() / max(num_tokens, 1)
        return DSSLossOutput(loss=total / denom, sft_loss=sft, kl_loss=kl_loss, num_tokens=num_tokens,
                             mean_weight=mean_weight)

    def _ref_logprobs(self, ref_logprobs: Tensor | None, n: int, device) -> Tensor:
        if ref_logprobs is None:
            if self.kl_coef != 0.0:
                raise ValueError(f"DSSLoss: ref_logprobs is required when kl_coef != 0 (kl_coef = {self.kl_coef})")
            return torch.zeros(n, dtype=torch.float32, device=device)
        if ref_logprobs.numel() != n:
            raise ValueError(f"DSSLoss: ref_logprobs has {ref_logprobs.numel()} elements but labels has {n}")
        return ref_logprobs.reshape(-1).detach()
