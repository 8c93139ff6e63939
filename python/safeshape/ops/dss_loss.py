"""DSS loss ops (docs/math.md#dss-loss): STAR-weighted cross-entropy plus a KL to the reference, per token.

Per token ``t`` with label ``y_t`` (``ignore_index`` = no loss), ``l_t = log softmax(z_t)[y_t]``:

    loss_t = w_t * (-l_t) + kl_coef * (1 - w_t) * 0.5 * (l_t - l_ref_t)^2          (the "k2" estimator)
    dloss_t/dz_t = c_t * (softmax(z_t) - onehot(y_t)),   c_t = w_t - kl_coef * (1 - w_t) * (l_t - l_ref_t)

Every op returns per-token values (float32; float64 for float64 inputs) with 0 at ignored rows, and the backward
applies the upstream gradient per token, so any reduction (mean over this call's tokens, or over the whole
optimizer step with ``num_items_in_batch``) is the caller's: see :class:`safeshape.loss.DSSLoss`.
Inputs may be float32, bfloat16, float16 (accumulation in float32) or float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.safeshape


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- public wrappers ---------------------------------------------------------------------------------------------

def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``log softmax(logits)[labels]`` per row of ``logits [N, V]``; 0 where ``labels == ignore_index``.

    One pass over each row (logsumexp and the label's logit); differentiable w.r.t. ``logits``.
    """
    return _ops.token_logprobs(logits, labels, ignore_index)[0]


def dss_loss(logits: Tensor, labels: Tensor, weights: Tensor, ref_logprobs: Tensor, kl_coef: float,
             ignore_index: int = -100) -> Tensor:
    """Per-token DSS loss of ``logits [N, V]`` (k2 KL at the data token); 0 at ignored rows.

    ``weights [N]`` are the STAR weights (SFT: all 1 with ``kl_coef = 0``; rejection sampling: per-example 0/1 with
    ``kl_coef = 0``), ``ref_logprobs [N]`` the reference model's log-probabilities of the labels (see
    :func:`token_logprobs`). Differentiable w.r.t. ``logits`` (native ``dss_loss_backward``), ``weights`` and
    ``ref_logprobs``; the upstream gradient may differ per token.
    """
    return _ops.dss_loss(logits, labels, weights, ref_logprobs, float(kl_coef), ignore_index)[0]


def dss_loss_and_logprobs(logits: Tensor, labels: Tensor, weights: Tensor, ref_logprobs: Tensor, kl_coef: float,
                          ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """:func:`dss_loss` and the policy's per-token log-probabilities (detached) from the same single pass."""
    loss, logprobs, _ = _ops.dss_loss(logits, labels, weights, ref_logprobs, float(kl_coef), ignore_index)
    return loss, logprobs


def dss_loss_full_kl(logits: Tensor, labels: Tensor, weights: Tensor, ref_logits: Tensor, kl_coef: float,
                     ignore_index: int = -100) -> Tensor:
    """Per-token DSS loss with the full-vocabulary ``KL(p_theta || p_ref)`` against reference LOGITS ``[N, V]``:
    ``loss_t = w_t (-l_t) + kl_coef (1 - w_t) KL_t``. Differentiable w.r.t. ``logits`` and ``weights``; the
    reference is frozen (``ref_logits`` must not require grad)."""
    return dss_loss_full_kl_and_parts(logits, labels, weights, ref_logits, kl_coef, ignore_index)[0]


def dss_loss_full_kl_and_parts(logits: Tensor, labels: Tensor, weights: Tensor, ref_logits: Tensor, kl_coef: float,
                               ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`dss_loss_full_kl` plus the detached per-token ``(logprobs, kl)`` from the same pass."""
    if ref_logits.requires_grad:
        raise ValueError("dss_loss_full_kl: ref_logits requires grad, but the reference model is frozen: pass "
                         "ref_logits.detach() (computed under torch.no_grad())")
    loss, logprobs, kl, _, _ = _ops.dss_loss_full_kl(logits, labels, weights, ref_logits, float(kl_coef),
                                                     ignore_index)
    return loss, logprobs, kl


def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100, *,
                                chunk_rows: int = 0) -> Tensor:
    """:func:`token_logprobs` of ``hidden [N, H] @ weight [V, H]^T`` without ever holding all ``[N, V]`` logits:
    they exist one chunk of ``chunk_rows`` rows at a time (0: at most 256 MiB of float32 logits per chunk).
    Differentiable w.r.t. ``hidden`` and ``weight`` (the backward recomputes each chunk's logits)."""
    return _ops.fused_linear_token_logprobs(hidden, weight, labels, ignore_index, chunk_rows)[0]


def fused_linear_dss_loss(hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor, ref_logprobs: Tensor,
                          kl_coef: float, ignore_index: int = -100, *, chunk_rows: int = 0) -> Tensor:
    """:func:`dss_loss` of ``hidden [N, H] @ weight [V, H]^T``, the logits one chunk of rows at a time.

    Gradients for ``hidden`` and ``weight`` (and ``weights``, ``ref_logprobs``) for any per-token upstream gradient:
    the backward recomputes each chunk's logits. For a summed / mean loss use :func:`fused_linear_dss_loss_sum`,
    which computes the gradients during the forward and needs one GEMM less.
    """
    return _ops.fused_linear_dss_loss(hidden, weight, labels, weights, ref_logprobs, float(kl_coef), ignore_index,
                                      chunk_rows)[0]


def fused_linear_dss_loss_and_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor,
                                       ref_logprobs: Tensor, kl_coef: float, ignore_index: int = -100, *,
                                       chunk_rows: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`fused_linear_dss_loss` and the detached per-token log-probabilities from the same pass."""
    loss, logprobs, _ = _ops.fused_linear_dss_loss(hidden, weight, labels, weights, ref_logprobs, float(kl_coef),
                                                   ignore_index, chunk_rows)
    return loss, logprobs


def fused_linear_dss_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor,
                              ref_logprobs: Tensor, kl_coef: float, ignore_index: int = -100, *,
                              chunk_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_t loss_t, per-token loss, per-token logprobs)``; only the sum is differentiable (w.r.t. ``hidden``
    and ``weight``; ``weights`` and ``ref_logprobs`` are data here).

    When a gradient is needed, the forward also forms the gradients of the sum (each chunk's logits are computed
    once: three GEMMs in all) and the backward only scales them by the scalar upstream gradient. A scalar upstream
    is what makes this exact; per-token upstream gradients need :func:`fused_linear_dss_loss`.
    """
    total, loss, logprobs = _FusedLinearDSSLossSum.apply(hidden, weight, labels, weights, ref_logprobs,
                                                         float(kl_coef), ignore_index, chunk_rows)
    return total, loss, logprobs


class _FusedLinearDSSLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, ref_logprobs, kl_coef, ignore_index, chunk_rows):
        # a frozen lm_head (LoRA) gets no [V, H] gradient: that buffer and its GEMM are skipped
        ctx.args = (kl_coef, ignore_index, chunk_rows, ctx.needs_input_grad[1])
        ctx.grads = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            loss, logprobs, grad_hidden, grad_weight = _FusedLinearDSSLossSum._with_grad(
                hidden, weight, labels, weights, ref_logprobs, *ctx.args)
            # kept as attributes, not saved tensors: the first backward scales them in place and hands them over,
            # so no second [V, H] buffer exists. The inputs are saved (no copies) for a second backward.
            ctx.grads = (grad_hidden, grad_weight)
            ctx.save_for_backward(hidden, weight, labels, weights, ref_logprobs)
        else:
            loss, logprobs, _ = _ops.fused_linear_dss_loss(hidden, weight, labels, weights, ref_logprobs, kl_coef,
                                                           ignore_index, chunk_rows)
        ctx.mark_non_differentiable(loss, logprobs)
        return loss.sum(), loss, logprobs

    @staticmethod
    def _with_grad(hidden, weight, labels, weights, ref_logprobs, kl_coef, ignore_index, chunk_rows, need_weight):
        ones = torch.ones(hidden.shape[0], dtype=_stat_dtype(hidden), device=hidden.device)
        return _ops.fused_linear_dss_loss_with_grad(hidden, weight, labels, weights, ref_logprobs, ones, kl_coef,
                                                    ignore_index, chunk_rows, need_weight)

    @staticmethod
    def backward(ctx, g_total, _g_loss, _g_logprobs):
        if ctx.grads is None:  # a second backward through the same graph (retain_graph): recompute
            _, _, grad_hidden, grad_weight = _FusedLinearDSSLossSum._with_grad(*ctx.saved_tensors, *ctx.args)
        else:
            grad_hidden, grad_weight = ctx.grads
            ctx.grads = None
        gh = grad_hidden.mul_(g_total.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = grad_weight.mul_(g_total.to(grad_weight.dtype)) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None


# ---- autograd ----------------------------------------------------------------------------------------------------

def _elementwise_grads(g_loss, logprobs, weights, ref, valid, kl_coef, need_w, need_r):
    """Gradients of loss_t w.r.t. weights and ref_logprobs (elementwise; 0 at ignored rows)."""
    gw = gr = None
    d = logprobs - ref.to(logprobs.dtype)
    if need_w:
        gw = torch.where(valid, g_loss * (-logprobs - kl_coef * 0.5 * d * d), 0.0).to(weights.dtype)
    if need_r:
        gr = torch.where(valid, g_loss * (-kl_coef * (1.0 - weights.to(d.dtype)) * d), 0.0).to(ref.dtype)
    return gw, gr


def _dss_loss_setup(ctx, inputs, output):
    logits, labels, weights, ref, kl_coef, ignore_index = inputs
    loss, logprobs, lse = output
    ctx.mark_non_differentiable(logprobs, lse)
    ctx.save_for_backward(logits, labels, weights, ref, logprobs, lse)
    ctx.kl_coef, ctx.ignore_index = kl_coef, ignore_index


def _dss_loss_backward(ctx, g_loss, _g_logprobs, _g_lse):
    logits, labels, weights, ref, logprobs, lse = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _ops.dss_loss_backward(g_loss, logits, labels, weights, ref, logprobs, lse, ctx.kl_coef,
                                             ctx.ignore_index)
    gw, gr = _elementwise_grads(g_loss, logprobs, weights, ref, labels != ctx.ignore_index, ctx.kl_coef,
                                ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    return grad_logits, None, gw, gr, None, None


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    logprobs, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, logprobs, lse)
    ctx.ignore_index = ignore_index


def _token_logprobs_backward(ctx, g_logprobs, _g_lse):
    logits, labels, logprobs, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    # dl/dz = onehot - softmax: the DSS backward with w = 1, kl_coef = 0 and the upstream gradient negated
    ones = torch.ones_like(logprobs)
    grad = _ops.dss_loss_backward(-g_logprobs, logits, labels, ones, torch.zeros_like(logprobs), logprobs, lse, 0.0,
                                  ctx.ignore_index)
    return grad, None, None


def _full_kl_setup(ctx, inputs, output):
    logits, labels, weights, ref_logits, kl_coef, ignore_index = inputs
    loss, logprobs, kl, lse, ref_lse = output
    ctx.mark_non_differentiable(logprobs, kl, lse, ref_lse)
    ctx.save_for_backward(logits, labels, weights, ref_logits, logprobs, kl, lse, ref_lse)
    ctx.kl_coef, ctx.ignore_index = kl_coef, ignore_index


def _full_kl_backward(ctx, g_loss, *_unused):
    logits, labels, weights, ref_logits, logprobs, kl, lse, ref_lse = ctx.saved_tensors
    grad_logits = gw = None
    if ctx.needs_input_grad[0]:
        grad_logits = _ops.dss_loss_full_kl_backward(g_loss, logits, labels, weights, ref_logits, lse, ref_lse, kl,
                                                     ctx.kl_coef, ctx.ignore_index)
    if ctx.needs_input_grad[2]:
        valid = labels != ctx.ignore_index
        gw = torch.where(valid, g_loss * (-logprobs - ctx.kl_coef * kl), 0.0).to(weights.dtype)
    return grad_logits, None, gw, None, None, None


def _fused_setup(ctx, inputs, output):
    hidden, weight, labels, weights, ref, kl_coef, ignore_index, chunk_rows = inputs
    loss, logprobs, lse = output
    ctx.mark_non_differentiable(logprobs, lse)
    ctx.save_for_backward(hidden, weight, labels, weights, ref, logprobs, lse)
    ctx.kl_coef, ctx.ignore_index, ctx.chunk_rows = kl_coef, ignore_index, chunk_rows


def _fused_backward(ctx, g_loss, _g_logprobs, _g_lse):
    hidden, weight, labels, weights, ref, logprobs, lse = ctx.saved_tensors
    gh = gwt = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        gh, gwt = _ops.fused_linear_dss_loss_backward(g_loss, hidden, weight, labels, weights, ref, logprobs, lse,
                                                      ctx.kl_coef, ctx.ignore_index, ctx.chunk_rows,
                                                      ctx.needs_input_grad[1])
        gh = gh if ctx.needs_input_grad[0] else None
        gwt = gwt if ctx.needs_input_grad[1] else None
    gw, gr = _elementwise_grads(g_loss, logprobs, weights, ref, labels != ctx.ignore_index, ctx.kl_coef,
                                ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    return gh, gwt, None, gw, gr, None, None, None


def _fused_logprobs_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, chunk_rows = inputs
    logprobs, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, labels, logprobs, lse)
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows


def _fused_logprobs_backward(ctx, g_logprobs, _g_lse):
    hidden, weight, labels, logprobs, lse = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    gh, gw = _ops.fused_linear_dss_loss_backward(-g_logprobs, hidden, weight, labels, torch.ones_like(logprobs),
                                                 torch.zeros_like(logprobs), logprobs, lse, 0.0, ctx.ignore_index,
                                                 ctx.chunk_rows, ctx.needs_input_grad[1])
    return (gh if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), None, None, None


torch.library.register_autograd("safeshape::dss_loss", _dss_loss_backward, setup_context=_dss_loss_setup)
torch.library.register_autograd("safeshape::token_logprobs", _token_logprobs_backward,
                                setup_context=_token_logprobs_setup)
torch.library.register_autograd("safeshape::dss_loss_full_kl", _full_kl_backward, setup_context=_full_kl_setup)
torch.library.register_autograd("safeshape::fused_linear_dss_loss", _fused_backward, setup_context=_fused_setup)
torch.library.register_autograd("safeshape::fused_linear_token_logprobs", _fused_logprobs_backward,
                                setup_context=_fused_logprobs_setup)


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


@torch.library.register_fake("safeshape::dss_loss")
def _dss_loss_fake(logits, labels, weights, ref_logprobs, kl_coef, ignore_index):
    _check_2d(logits, "dss_loss", "logits")
    n = logits.shape[0]
    return _rows(logits, n), _rows(logits, n), _lse(logits, n)


@torch.library.register_fake("safeshape::dss_loss_backward")
def _dss_loss_backward_fake(grad_loss, logits, labels, weights, ref_logprobs, logprobs, logsumexp, kl_coef,
                            ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("safeshape::dss_loss_full_kl")
def _dss_loss_full_kl_fake(logits, labels, weights, ref_logits, kl_coef, ignore_index):
    _check_2d(logits, "dss_loss_full_kl", "logits")
    n = logits.shape[0]
    return _rows(logits, n), _rows(logits, n), _rows(logits, n), _lse(logits, n), _lse(logits, n)


@torch.library.register_fake("safeshape::dss_loss_full_kl_backward")
def _dss_loss_full_kl_backward_fake(grad_loss, logits, labels, weights, ref_logits, logsumexp, ref_logsumexp, kl,
                                    kl_coef, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("safeshape::fused_linear_token_logprobs")
def _fused_token_logprobs_fake(hidden, weight, labels, ignore_index, chunk_rows):
    _check_2d(hidden, "fused_linear_token_logprobs", "hidden")
    n = hidden.shape[0]
    return _rows(hidden, n), _lse(hidden, n)


@torch.library.register_fake("safeshape::fused_linear_dss_loss")
def _fused_dss_loss_fake(hidden, weight, labels, weights, ref_logprobs, kl_coef, ignore_index, chunk_rows):
    _check_2d(hidden, "fused_linear_dss_loss", "hidden")
    n = hidden.shape[0]
    return _rows(hidden, n), _rows(hidden, n), _lse(hidden, n)


@torch.library.register_fake("safeshape::fused_linear_dss_loss_backward")
def _fused_dss_loss_backward_fake(grad_loss, hidden, weight, labels, weights, ref_logprobs, logprobs, logsumexp,
                                  kl_coef, ignore_index, chunk_rows, compute_grad_weight):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), _grad_weight_fake(weight,
                                                                                              compute_grad_weight)


def _grad_weight_fake(weight, compute):
    return torch.empty_like(weight, memory_format=torch.contiguous_format) if compute else weight.new_empty((0,))


@torch.library.register_fake("safeshape::fused_linear_dss_loss_with_grad")
def _fused_dss_loss_with_grad_fake(hidden, weight, labels, weights, ref_logprobs, grad_loss, kl_coef, ignore_index,
                                   chunk_rows, compute_grad_weight):
    _check_2d(hidden, "fused_linear_dss_loss_with_grad", "hidden")
    n = hidden.shape[0]
    return (_rows(hidden, n), _rows(hidden, n), torch.empty_like(hidden, memory_format=torch.contiguous_format),
            _grad_weight_fake(weight, compute_grad_weight))
