"""Token-loss ops (docs/math.md#dss-loss, docs/math.md#deep-token): DSS, SFT, rejection sampling and Deep Token through one primitive.

Every objective depends on the logits ``z_t`` only through ``l_t = log softmax(z_t)[y_t]``, so
``dloss/dz_t = (dloss/dl_t) (onehot(y_t) - softmax(z_t))``. The native ops are:

- row ops ``token_logprobs`` (``l_t`` and ``logsumexp`` per row) and ``token_logprobs_backward_`` (in place);
- ``token_objective``: the per-token loss of ``(l_t, l_ref_t, w_t, position_t)`` and its derivative in ``l_t``:

      logprob      w l
      sft          w (-l)                                             (RS: sft on the kept rows only)
      dss_k2       w (-l) + kl_coef (1 - w) 0.5 (l - l_ref)^2         params [kl_coef]
                   the k2 term clamped to [-C, C] (OpenRLHF's)         params [kl_coef, C] (docs/math.md#dss-kl-clamp)
      deep_token   w (2 / beta_t) (-log sigmoid(beta_t (l - l_ref)))  params [beta_1, ..., beta_k]

  with ``beta_t = params[min(t, k) - 1]`` at the 1-based position ``t`` of the token in its response;
- ``fused_linear_token_loss``: any objective of ``hidden @ weight.T`` without the ``[N, V]`` logits, optionally with
  the gradients of the summed loss from the same pass;
- ``full_kl`` / ``full_kl_backward``: the full-vocabulary ``KL(p || q)`` against reference logits.

Per-token values are float32 (float64 for float64 inputs) with 0 at ignored rows; reductions are the caller's (see
:mod:`safeshape.loss`). ``weights``, ``ref_logprobs`` and ``positions`` are data: no gradient flows to them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ops = torch.ops.safeshape

OBJECTIVES = ("logprob", "sft", "dss_k2", "deep_token")


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _params(params: Sequence[float]) -> list[float]:
    return [float(p) for p in params]


# ---- public wrappers ---------------------------------------------------------------------------------------------

def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``log softmax(logits)[labels]`` per row of ``logits [N, V]``; 0 where ``labels == ignore_index``.
    One pass over each row; differentiable w.r.t. ``logits``."""
    return _ops.token_logprobs(logits, labels, ignore_index)[0]


def token_objective(logprobs: Tensor, labels: Tensor, objective: str, params: Sequence[float] = (), *,
                    weights: Tensor | None = None, ref_logprobs: Tensor | None = None,
                    positions: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Per-token loss of ``objective`` (see the module docstring) from the log-probabilities ``[N]``; 0 at ignored
    rows. Differentiable w.r.t. ``logprobs``."""
    return _ops.token_objective(logprobs, labels, weights, ref_logprobs, positions, objective, _params(params),
                                ignore_index)[0]


def full_kl(logits: Tensor, ref_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(l_t, KL(softmax(logits_t) || softmax(ref_logits_t)))`` per row, 0 at ignored rows; differentiable w.r.t.
    ``logits`` (the reference is frozen: ``ref_logits`` must not require grad)."""
    if ref_logits.requires_grad:
        raise ValueError("full_kl: ref_logits requires grad, but the reference model is frozen: pass "
                         "ref_logits.detach() (computed under torch.no_grad())")
    logprobs, kl, _, _ = _ops.full_kl(logits, ref_logits, labels, ignore_index)
    return logprobs, kl


def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100, *,
                                chunk_rows: int = 0) -> Tensor:
    """:func:`token_logprobs` of ``hidden [N, H] @ weight [V, H]^T`` without ever holding all ``[N, V]`` logits:
    they exist one chunk of ``chunk_rows`` rows at a time (0: at most 128 MiB of float32 logits per chunk).
    Differentiable w.r.t. ``hidden`` and ``weight`` (the backward recomputes each chunk's logits)."""
    return fused_linear_token_loss(hidden, weight, labels, "logprob", ignore_index=ignore_index,
                                   chunk_rows=chunk_rows)[1]


def fused_linear_token_loss(hidden: Tensor, weight: Tensor, labels: Tensor, objective: str,
                            params: Sequence[float] = (), *, weights: Tensor | None = None,
                            ref_logprobs: Tensor | None = None, positions: Tensor | None = None,
                            ignore_index: int = -100, chunk_rows: int = 0) -> tuple[Tensor, Tensor]:
    """Per-token ``(loss, logprobs)`` of ``objective`` on ``hidden [N, H] @ weight [V, H]^T``, the logits one chunk
    of rows at a time. Both are differentiable w.r.t. ``hidden`` and ``weight`` for any per-token upstream gradient
    (the backward recomputes each chunk's logits: four GEMMs). For a summed or mean loss use
    :func:`fused_linear_token_loss_sum` (three GEMMs)."""
    loss, logprobs, _, _, _ = _ops.fused_linear_token_loss(hidden, weight, labels, weights, ref_logprobs, positions,
                                                           objective, _params(params), ignore_index, chunk_rows,
                                                           False, False, False)
    return loss, logprobs


def fused_linear_token_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor, objective: str,
                                params: Sequence[float] = (), *, weights: Tensor | None = None,
                                ref_logprobs: Tensor | None = None, positions: Tensor | None = None,
                                ignore_index: int = -100, chunk_rows: int = 0,
                                fp32_grad_weight: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_t loss_t, per-token loss, per-token logprobs)``; only the sum is differentiable (w.r.t. ``hidden`` and
    ``weight``).

    When a gradient is needed (grad mode on and ``hidden`` or ``weight`` requiring grad), the forward also forms the
    gradients of the sum in the same pass (each chunk's logits are computed once: three GEMMs in all) and the
    backward only scales them by the scalar upstream gradient. ``fp32_grad_weight``: accumulate a bfloat16 / float16
    lm-head gradient in float32 over the chunks (rounded once, at the end).
    """
    args = (labels, weights, ref_logprobs, positions, objective, _params(params), ignore_index, chunk_rows)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # no gradient wanted (e.g. under torch.no_grad()): the forward alone, no [V, H] buffer
        loss, logprobs, _, _, _ = _ops.fused_linear_token_loss(hidden, weight, *args, False, False, False)
        return loss.sum(), loss, logprobs
    return _FusedLinearTokenLossSum.apply(hidden, weight, *args, fp32_grad_weight)


class _FusedLinearTokenLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, ref_logprobs, positions, objective, params, ignore_index,
                chunk_rows, fp32_grad_weight):
        # a frozen lm_head (LoRA) gets no [V, H] gradient: that buffer and its GEMM are skipped
        ctx.args = (labels, weights, ref_logprobs, positions, objective, params, ignore_index, chunk_rows, True,
                    ctx.needs_input_grad[1], fp32_grad_weight)
        loss, logprobs, _, grad_hidden, grad_weight = _ops.fused_linear_token_loss(hidden, weight, *ctx.args)
        return keep_sum_grads(ctx, hidden, weight, loss, logprobs, grad_hidden, grad_weight)

    @staticmethod
    def backward(ctx, g_total, _g_loss, _g_logprobs):
        gh, gw = scaled_sum_grads(ctx, g_total,
                                  lambda: _ops.fused_linear_token_loss(*ctx.saved_tensors, *ctx.args)[3:])
        return gh, gw, *(None,) * 9


def keep_sum_grads(ctx, hidden: Tensor, weight: Tensor, loss: Tensor, logprobs: Tensor, grad_hidden: Tensor | None,
                   grad_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward's end of a summed loss that forms its gradients in the forward: ``(loss.sum(), loss,
    logprobs)``. The gradients are kept as attributes, not saved tensors: the first backward
    (:func:`scaled_sum_grads`) scales them in place and hands them over, so no second [V, H] buffer exists. The
    inputs are saved (no copies) for a second backward."""
    ctx.grads = (grad_hidden, grad_weight)
    ctx.save_for_backward(hidden, weight)
    ctx.mark_non_differentiable(loss, logprobs)
    return loss.sum(), loss, logprobs


def scaled_sum_grads(ctx, g_total: Tensor, recompute) -> tuple[Tensor | None, Tensor | None]:
    """The backward of a summed loss whose forward formed its gradients ``ctx.grads = (grad_hidden, grad_weight)``:
    those scaled in place by the scalar upstream gradient and handed over (no second buffer); a second backward
    through the same graph (retain_graph) gets them from ``recompute()``. Also serves the vocabulary-parallel loss
    (safeshape.parallel.vocab)."""
    if ctx.grads is None:
        grad_hidden, grad_weight = recompute()
    else:
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
    gh = grad_hidden.mul_(g_total.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
    gw = grad_weight.mul_(g_total.to(grad_weight.dtype)) if ctx.needs_input_grad[1] else None
    return gh, gw


# ---- autograd ----------------------------------------------------------------------------------------------------

def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index


def _token_logprobs_backward(ctx, g_logprobs, _g_lse):
    logits, labels, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    grad = logits.detach().clone(memory_format=torch.contiguous_format)
    _ops.token_logprobs_backward_(grad, g_logprobs, labels, lse, ctx.ignore_index)
    return grad, None, None


def _objective_setup(ctx, inputs, output):
    _, dloss = output
    ctx.mark_non_differentiable(dloss)
    ctx.save_for_backward(dloss)


def _objective_backward(ctx, g_loss, _g_dloss):
    (dloss,) = ctx.saved_tensors
    grad = (g_loss * dloss) if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None, None, None, None


def _full_kl_setup(ctx, inputs, output):
    logits, ref_logits, labels, ignore_index = inputs
    logprobs, kl, lse, ref_lse = output
    ctx.mark_non_differentiable(lse, ref_lse)
    ctx.save_for_backward(logits, ref_logits, labels, kl, lse, ref_lse)
    ctx.ignore_index = ignore_index


def _full_kl_backward(ctx, g_logprobs, g_kl, _g_lse, _g_ref_lse):
    logits, ref_logits, labels, kl, lse, ref_lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    grad = _ops.full_kl_backward(g_logprobs, g_kl, logits, ref_logits, labels, lse, ref_lse, kl, ctx.ignore_index)
    return grad, None, None, None


def _fused_setup(ctx, inputs, output):
    hidden, weight, labels, _w, _ref, _pos, _obj, _params, ignore_index, chunk_rows = inputs[:10]
    _, _, dloss, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(dloss, grad_hidden, grad_weight)
    ctx.save_for_backward(hidden, weight, labels, dloss)
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows


def _fused_backward(ctx, g_loss, g_logprobs, *_unused):
    hidden, weight, labels, dloss = ctx.saved_tensors
    none = (None,) * 11
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, *none
    # the gradient of sum_t (g_loss_t loss_t + g_logprobs_t l_t) is that of objective "logprob" with w = g_l
    g_l = g_loss * dloss + g_logprobs
    _, _, _, gh, gw = _ops.fused_linear_token_loss(hidden, weight, labels, g_l, None, None, "logprob", [],
                                                   ctx.ignore_index, ctx.chunk_rows, True, ctx.needs_input_grad[1],
                                                   False)
    return (gh if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), *none


torch.library.register_autograd("safeshape::token_logprobs", _token_logprobs_backward,
                                setup_context=_token_logprobs_setup)
torch.library.register_autograd("safeshape::token_objective", _objective_backward, setup_context=_objective_setup)
torch.library.register_autograd("safeshape::full_kl", _full_kl_backward, setup_context=_full_kl_setup)
torch.library.register_autograd("safeshape::fused_linear_token_loss", _fused_backward, setup_context=_fused_setup)


# ---- fake (meta) kernels -----------------------------------------------------------------------------------------

def _rows(t: Tensor, n) -> Tensor:
    return t.new_empty((n,), dtype=_stat_dtype(t))


def _lse(t: Tensor, n) -> Tensor:  # logsumexp is kept in float64: logits of 1e4 need more than float32's 1e-3
    return t.new_empty((n,), dtype=torch.float64)


def _check_2d(t: Tensor, op: str, name: str) -> None:
    torch._check(t.dim() == 2, lambda: f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")


@torch.library.register_fake("safeshape::token_logprobs")
def _token_logprobs_fake(logits, labels, ignore_index):
    _check_2d(logits, "token_logprobs", "logits")
    n = logits.shape[0]
    return _rows(logits, n), _lse(logits, n)


@torch.library.register_fake("safeshape::token_logprobs_backward_")
def _token_logprobs_backward_fake(logits, grad_logprobs, labels, logsumexp, ignore_index):
    return None


@torch.library.register_fake("safeshape::token_objective")
def _token_objective_fake(logprobs, labels, weights, ref_logprobs, positions, objective, params, ignore_index):
    n = logprobs.shape[0]
    return _rows(logprobs, n), _rows(logprobs, n)


@torch.library.register_fake("safeshape::fused_linear_token_loss")
def _fused_fake(hidden, weight, labels, weights, ref_logprobs, positions, objective, params, ignore_index,
                chunk_rows, compute_grad, compute_grad_weight, fp32_grad_weight):
    _check_2d(hidden, "fused_linear_token_loss", "hidden")
    n = hidden.shape[0]
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if compute_grad else hidden.new_empty((0,))
    if compute_grad and compute_grad_weight:
        wide = fp32_grad_weight and weight.dtype in (torch.bfloat16, torch.float16)
        gw = weight.new_empty(weight.shape, dtype=torch.float32 if wide else weight.dtype)
    else:
        gw = weight.new_empty((0,))
    return _rows(hidden, n), _rows(hidden, n), _rows(hidden, n), gh, gw


@torch.library.register_fake("safeshape::full_kl")
def _full_kl_fake(logits, ref_logits, labels, ignore_index):
    _check_2d(logits, "full_kl", "logits")
    n = logits.shape[0]
    return _rows(logits, n), _rows(logits, n), _lse(logits, n), _lse(logits, n)


@torch.library.register_fake("safeshape::full_kl_backward")
def _full_kl_backward_fake(grad_logprobs, grad_kl, logits, ref_logits, labels, logsumexp, ref_logsumexp, kl,
                           ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)
