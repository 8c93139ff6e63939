"""The training losses (docs/math.md#dss-loss, docs/math.md#deep-token) as modules: what the trainer minimises on every step.

    DSSLoss:        (1 / N) sum_t [ w_t (-l_t) + kl_coef (1 - w_t) 0.5 (l_t - l_ref_t)^2 ]
                    (kl_clamp C: the k2 term min(0.5 (l_t - l_ref_t)^2, C), as OpenRLHF since July 2025)
    DeepTokenLoss:  (1 / N) sum_t (2 / beta_t) (-log sigmoid(beta_t (l_t - l_ref_t)))

over the valid (label != ignore_index) tokens t. N is the number of valid tokens of this call, or, under gradient
accumulation, ``num_items_in_batch``: the valid tokens of the whole optimizer step (as transformers passes it), so
that k micro-batches accumulate exactly the gradient of one big batch. N is kept on the device (no host sync).

Special cases of DSSLoss, all just weights tensors:

- SFT: ``weights = sft_weights(labels)`` (all 1) and ``kl_coef = 0``: the usual mean token cross-entropy.
- Rejection sampling (RS) as the paper describes it: SFT on the kept rows only (drop the rejected rows before the
  loss, so N counts kept tokens). ``rs_weights(labels, keep)`` with ``kl_coef = 0`` keeps the rejected rows with
  weight 0 and divides by all tokens, as the authors' released code does: the same direction with a smaller step.
- DSS: per-token STAR weights in [0, 1] and ``kl_coef > 0`` (default 0.5) with the reference log-probabilities.

Labels must already be aligned with the rows (the caller shifts them for next-token prediction).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from .parallel import head
from .schedules import DEEP_TOKEN_BETAS  # noqa: F401  (re-exported: safeshape.loss.DEEP_TOKEN_BETAS)


def uses_reference(loss: str, kl_coef: float) -> bool:
    """Whether a training loss reads the reference model's log-probs (the adapter-disabled pass): DSS with a KL
    term, and Deep Token."""
    return (loss == "dss" and kl_coef > 0) or loss == "deep-token"


@dataclass
class DSSLossOutput:
    """``loss``: differentiable scalar, ``sum of per-token losses / normaliser``. ``sft_loss``: detached
    ``sum_t w_t (-l_t) / normaliser``; ``kl_loss``: the detached rest, ``sft_loss + kl_loss == loss``.
    ``num_tokens``: valid tokens in this call (0-d tensor). ``mean_weight``: detached mean weight over the valid
    tokens (0 when there are none)."""

    loss: Tensor
    sft_loss: Tensor
    kl_loss: Tensor
    num_tokens: Tensor
    mean_weight: Tensor


def sft_weights(labels: Tensor) -> Tensor:
    """Weights for plain SFT: 1 for every token (use with ``kl_coef = 0``)."""
    return torch.ones(labels.shape, dtype=torch.float32, device=labels.device)


def rs_weights(labels: Tensor, keep: Tensor) -> Tensor:
    """Per-token weights for rejection sampling kept as zeros: ``keep [B]`` (bool or 0/1) broadcast over
    ``labels [B, T]``. (The authors drop rejected rows instead; see the module docstring.)"""
    if keep.dim() != 1 or labels.dim() < 1 or keep.shape[0] != labels.shape[0]:
        raise ValueError(f"rs_weights: keep must have shape [{labels.shape[0] if labels.dim() else '?'}] (one value "
                         f"per example of labels {tuple(labels.shape)}), got {tuple(keep.shape)}")
    w = keep.to(device=labels.device, dtype=torch.float32)
    return w.reshape(-1, *([1] * (labels.dim() - 1))).expand(labels.shape).contiguous()


def response_positions(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """1-based position of each token in its row's response for ``labels [B, T]`` (already shifted): the k-th
    valid label of a row has position k, counted from the row's first valid label (as the authors of Deep Token
    count); 0 at ignored tokens."""
    valid = labels != ignore_index
    return torch.where(valid, valid.long().cumsum(-1), 0)


class _TokenLoss(nn.Module):
    """A mean per-token objective over policy logits (``fused=False``) or over hidden states and the lm-head weight
    (``fused=True``: the ``[tokens, vocab]`` logits never exist in full). ``lm_head_weight`` is the head's weight or,
    under a sharded stack, the head module or the model (:mod:`safeshape.parallel.head`)."""

    objective: str
    name: str

    def __init__(self, fused: bool, ignore_index: int, chunk_rows: int, fp32_grad_weight: bool):
        super().__init__()
        self.fused, self.ignore_index, self.chunk_rows = fused, ignore_index, chunk_rows
        self.fp32_grad_weight = fp32_grad_weight

    def params(self) -> list[float]:
        return []

    def _normaliser(self, valid: Tensor, num_items_in_batch) -> tuple[Tensor, Tensor | float]:
        num_tokens = valid.sum()
        if num_items_in_batch is None:
            return num_tokens, num_tokens.clamp_min(1)
        # a step with no valid token at all gives loss 0 (as the num_items_in_batch=None path does), not 0/0
        if isinstance(num_items_in_batch, Tensor):
            return num_tokens, num_items_in_batch.to(device=valid.device, dtype=torch.float32).clamp_min(1)
        if num_items_in_batch < 0:
            raise ValueError(f"{self.name}: num_items_in_batch must be >= 0, got {num_items_in_batch}")
        return num_tokens, float(max(num_items_in_batch, 1))

    def _check(self, labels: Tensor, name: str, t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if t.numel() != labels.shape[0]:
            raise ValueError(f"{self.name}: {name} has {t.numel()} elements but labels has {labels.shape[0]} (one "
                             "per token)")
        return t.reshape(-1).detach()

    def _mean(self, *, labels, weights, ref_logprobs, positions, logits, hidden, lm_head_weight,
              num_items_in_batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(total / N, per-token loss, logprobs, num_tokens, N)"""
        labels = labels.reshape(-1)
        weights = self._check(labels, "weights", weights)
        ref_logprobs = self._check(labels, "ref_logprobs", ref_logprobs)
        positions = self._check(labels, "positions", positions)
        kw = dict(weights=weights, ref_logprobs=ref_logprobs, positions=positions, ignore_index=self.ignore_index)
        if self.fused:
            if hidden is None or lm_head_weight is None:
                raise ValueError(f"{self.name}(fused=True): pass hidden and lm_head_weight (or build it with "
                                 "fused=False and pass logits)")
            # the weight however a sharded stack holds it (FSDP1/FSDP2/ZeRO-3 gathered, tensor parallel)
            total, per_token, logprobs = head.fused_linear_token_loss_sum(
                hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, labels, self.objective, self.params(),
                chunk_rows=self.chunk_rows, fp32_grad_weight=self.fp32_grad_weight, **kw)
        else:
            if logits is None:
                raise ValueError(f"{self.name}(fused=False): pass logits")
            logprobs = ops.token_logprobs(logits.reshape(-1, logits.shape[-1]), labels, self.ignore_index)
            per_token = ops.token_objective(logprobs, labels, self.objective, self.params(), **kw)
            total = per_token.sum()
        num_tokens, denom = self._normaliser(labels != self.ignore_index, num_items_in_batch)
        return total / denom, per_token, logprobs.detach(), num_tokens, denom

    def _output(self, labels, weights, loss, logprobs, num_tokens, denom, kl_part=None) -> DSSLossOutput:
        """``kl_part``: the per-token loss beyond ``w (-l)`` when it is known in closed form (more exact than
        ``loss - sft_loss`` when it is small)."""
        with torch.no_grad():
            valid = labels.reshape(-1) != self.ignore_index
            w = torch.ones_like(logprobs) if weights is None else weights.reshape(-1).to(logprobs.dtype)
            sft = torch.where(valid, w * -logprobs, 0.0).sum() / denom
            mean_weight = torch.where(valid, w, 0.0).sum() / num_tokens.clamp_min(1)
            kl_loss = loss.detach() - sft if kl_part is None else torch.where(valid, kl_part, 0.0).sum() / denom
        return DSSLossOutput(loss=loss, sft_loss=sft, kl_loss=kl_loss, num_tokens=num_tokens,
                             mean_weight=mean_weight)


class DSSLoss(_TokenLoss):
    """The DSS loss (docs/math.md#dss-normalisation).

    ``kl="k2"``: the KL term is the k2 estimator at the data token (needs ``ref_logprobs``, e.g. from
    :func:`safeshape.ops.token_logprobs` or :func:`safeshape.ops.fused_linear_token_logprobs` on the reference
    model under ``torch.no_grad()``; not needed when ``kl_coef = 0``). ``kl="full"``: the full-vocabulary
    ``KL(p_theta || p_ref)`` against ``ref_logits``; it needs ``fused=False``. ``fp32_grad_weight``: accumulate a
    bfloat16 lm-head gradient in float32 across chunks (fused path). ``kl_clamp``: bound the k2 term by ``C`` as
    OpenRLHF's ``compute_approx_kl`` clamps its estimate since July 2025 (docs/math.md#dss-kl-clamp; no gradient
    from the KL term where ``0.5 (l - l_ref)^2 >= C``); None (default): unbounded, the authors' loss.
    """

    objective = "dss_k2"
    name = "DSSLoss"

    def __init__(self, kl_coef: float = 0.5, kl: str = "k2", fused: bool = True, ignore_index: int = -100,
                 chunk_rows: int = 0, fp32_grad_weight: bool = False, kl_clamp: float | None = None):
        super().__init__(fused, ignore_index, chunk_rows, fp32_grad_weight)
        if kl not in ("k2", "full"):
            raise ValueError(f"DSSLoss: kl must be 'k2' or 'full', got {kl!r}")
        if kl == "full" and fused:
            raise ValueError("DSSLoss: kl='full' needs the reference logits [tokens, vocab] and works only with "
                             "fused=False")
        if kl_coef < 0:
            raise ValueError(f"DSSLoss: kl_coef must be >= 0, got {kl_coef}")
        if kl_clamp is not None:
            if not (math.isfinite(kl_clamp) and kl_clamp > 0):
                raise ValueError(f"DSSLoss: kl_clamp must be a finite number > 0 (or None), got {kl_clamp}")
            if kl != "k2":
                raise ValueError("DSSLoss: kl_clamp applies to kl='k2' (OpenRLHF's clamp of its k2 estimate)")
        self.kl_coef, self.kl = float(kl_coef), kl
        self.kl_clamp = None if kl_clamp is None else float(kl_clamp)

    def params(self) -> list[float]:
        return [self.kl_coef] if self.kl_clamp is None else [self.kl_coef, self.kl_clamp]

    def extra_repr(self) -> str:
        clamp = "" if self.kl_clamp is None else f", kl_clamp={self.kl_clamp}"
        return f"kl_coef={self.kl_coef}, kl={self.kl!r}{clamp}, fused={self.fused}, ignore_index={self.ignore_index}"

    def forward(self, *, labels: Tensor, weights: Tensor, ref_logprobs: Tensor | None = None,
                logits: Tensor | None = None, hidden: Tensor | None = None, lm_head_weight: Tensor | None = None,
                ref_logits: Tensor | None = None, num_items_in_batch: int | Tensor | None = None) -> DSSLossOutput:
        n = labels.numel()
        if weights.numel() != n:
            raise ValueError(f"DSSLoss: weights has {weights.numel()} elements but labels has {n} (one weight per "
                             "token; for per-example weights use rs_weights)")
        if self.kl == "full":
            return self._full_kl(labels, weights, logits, ref_logits, num_items_in_batch)
        if ref_logprobs is None:
            if self.kl_coef != 0.0:
                raise ValueError(f"DSSLoss: ref_logprobs is required when kl_coef != 0 (kl_coef = {self.kl_coef})")
            ref_logprobs = torch.zeros(n, dtype=torch.float32, device=labels.device)
        loss, _, logprobs, num_tokens, denom = self._mean(
            labels=labels, weights=weights, ref_logprobs=ref_logprobs, positions=None, logits=logits, hidden=hidden,
            lm_head_weight=lm_head_weight, num_items_in_batch=num_items_in_batch)
        d = logprobs - ref_logprobs.reshape(-1).detach().to(logprobs.dtype)
        if self.kl_clamp is None:
            kl_part = self.kl_coef * (1.0 - weights.reshape(-1).to(d.dtype)) * 0.5 * d * d
        else:
            kl_part = self.kl_coef * (1.0 - weights.reshape(-1).to(d.dtype)) * (0.5 * d * d).clamp(max=self.kl_clamp)
        return self._output(labels, weights, loss, logprobs, num_tokens, denom, kl_part)

    def _full_kl(self, labels, weights, logits, ref_logits, num_items_in_batch) -> DSSLossOutput:
        if logits is None or ref_logits is None:
            raise ValueError("DSSLoss(kl='full'): pass logits and ref_logits")
        labels, v = labels.reshape(-1), logits.shape[-1]
        logprobs, kl = ops.full_kl(logits.reshape(-1, v), ref_logits.reshape(-1, v), labels, self.ignore_index)
        w = weights.reshape(-1).detach().to(logprobs.dtype)
        per_token = w * -logprobs + self.kl_coef * (1.0 - w) * kl  # both 0 at ignored rows
        num_tokens, denom = self._normaliser(labels != self.ignore_index, num_items_in_batch)
        return self._output(labels, weights, per_token.sum() / denom, logprobs.detach(), num_tokens, denom,
                            self.kl_coef * (1.0 - w) * kl.detach())


class DeepTokenLoss(_TokenLoss):
    """Deep Token, the token-wise constrained objective of Qi et al. (ICLR 2025; docs/math.md#deep-token):
    ``(1/N) sum_t (2 / beta_t) (-log sigmoid(beta_t (l_t - l_ref_t)))`` with ``beta_t = betas[min(t, k) - 1]`` at the
    1-based response position ``t`` (:func:`response_positions`). Needs ``ref_logprobs`` (the aligned model's, as
    DSS) and ``positions``; ``weights`` (optional) scale each token (1: the paper's objective)."""

    objective = "deep_token"
    name = "DeepTokenLoss"

    def __init__(self, betas: Sequence[float] = DEEP_TOKEN_BETAS, fused: bool = True, ignore_index: int = -100,
                 chunk_rows: int = 0, fp32_grad_weight: bool = False):
        super().__init__(fused, ignore_index, chunk_rows, fp32_grad_weight)
        betas = tuple(float(b) for b in betas)
        if not betas or not all(b > 0 for b in betas):
            raise ValueError(f"DeepTokenLoss: betas must be a non-empty list of positive numbers, got {betas}")
        self.betas = betas

    def params(self) -> list[float]:
        return list(self.betas)

    def extra_repr(self) -> str:
        return f"betas={self.betas}, fused={self.fused}, ignore_index={self.ignore_index}"

    def forward(self, *, labels: Tensor, ref_logprobs: Tensor, positions: Tensor, weights: Tensor | None = None,
                logits: Tensor | None = None, hidden: Tensor | None = None, lm_head_weight: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None) -> DSSLossOutput:
        loss, _, logprobs, num_tokens, denom = self._mean(
            labels=labels, weights=weights, ref_logprobs=ref_logprobs, positions=positions, logits=logits,
            hidden=hidden, lm_head_weight=lm_head_weight, num_items_in_batch=num_items_in_batch)
        return self._output(labels, weights, loss, logprobs, num_tokens, denom)
