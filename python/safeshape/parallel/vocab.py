"""The fused token loss over a head sharded by vocabulary (docs/vocab-parallel.md): the head is never gathered.

Every objective depends on the logits only through ``l_t = z_t[y_t] - logsumexp(z_t)`` (docs/math.md#dss-loss), and
both terms split over vocabulary slices: ``logsumexp(z_t) = logsumexp_r(lse_r,t)`` over the ranks' slice
log-sum-exps, and ``z_t[y_t]`` sits on exactly one rank. So per chunk of rows each rank computes its slice's logits,
reduces them with the native row op (``token_logprobs``: ``lse_r,t`` in float64) and a gather of its label logits,
and one all-gather of ``[3, m]`` per rank (slice lse, label logit, label-here count) gives every rank ``l_t`` for all
rows. ``dloss/dl_t`` comes from the native ``token_objective`` (no copy of any objective's math), and the local
logit gradient ``dloss/dl_t (onehot(y_t) - softmax(z_t))`` restricted to the slice from the native
``token_logprobs_backward_`` with the global lse. Local gradients: the weight shard's (complete) and the hidden
states' (a partial sum over the vocabulary, all-reduced over the group in backward, as Megatron's column-parallel
input is).

Communication per call: one all-gather of two integers (the partition check), one all-gather of ``3 m`` float64
per chunk of ``m`` rows, and in backward one all-reduce of the ``[N, H]`` hidden gradient; never the ``V x H`` head
or its gradient.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.token_loss import keep_sum_grads, scaled_sum_grads  # (importing ops loads the native ops)

_ops = torch.ops.safeshape

# at most this many bytes of float32-equivalent logits per chunk (the native fused op's budget)
_CHUNK_BYTES = 128 << 20
_NAME = "vocab_parallel_fused_linear_token_loss_sum"


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _gather_rows(t: Tensor, group) -> Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (all_gather with a list: gloo has no flat all-gather of 2-D)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _vocab_size(weight_shard: Tensor, vocab_start: int, group) -> int:
    """The full vocabulary, after checking that the ranks' ``[vocab_start, vocab_start + rows)`` tile ``[0, V)``
    (a wrong offset would otherwise give a wrong loss without an error)."""
    mine = torch.tensor([vocab_start, weight_shard.shape[0]], dtype=torch.long, device=weight_shard.device)
    spans = sorted((int(s), int(n)) for s, n in _gather_rows(mine, group).cpu().tolist())
    end = 0
    for s, n in spans:
        if s != end:
            raise ValueError(f"{_NAME}: the vocabulary slices [vocab_start, vocab_start + weight_shard rows) of the "
                             f"group's ranks must tile [0, V) without gaps or overlaps; got {spans} "
                             f"(this rank: vocab_start={vocab_start}, {weight_shard.shape[0]} rows)")
        end = s + n
    return end


def _check_inputs(hidden: Tensor, weight_shard: Tensor, labels: Tensor, vocab: int, ignore_index: int) -> None:
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard)):
        if t.dim() != 2:
            raise ValueError(f"{_NAME}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if weight_shard.shape[1] != hidden.shape[1]:
        raise ValueError(f"{_NAME}: weight_shard is [vocab slice, hidden] = {tuple(weight_shard.shape)} but hidden "
                         f"has {hidden.shape[1]} columns")
    if weight_shard.shape[0] == 0:
        raise ValueError(f"{_NAME}: weight_shard has no rows: this rank holds no part of the vocabulary (a vocabulary "
                         f"of {vocab} over more ranks than rows); use fewer tensor-parallel ranks")
    if labels.shape != (hidden.shape[0],) or labels.is_floating_point():
        raise ValueError(f"{_NAME}: labels must be an integer tensor of shape [{hidden.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if labels.device.type == "cpu":  # on CUDA a check would be a host sync: a label on no rank gives NaN instead
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{_NAME}: labels[{i}] = {int(labels[i])} is outside [0, {vocab}) (the vocabulary of "
                             f"the whole group) and is not ignore_index ({ignore_index})")


def _local_labels(labels: Tensor, vocab_start: int, rows: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(labels for the row ops on this slice, label-here mask, valid mask). A label on another rank becomes column
    0 (a stand-in whose one-hot the backward takes out again): the row op then still gives the slice's lse."""
    valid = labels != ignore_index
    here = valid & (labels >= vocab_start) & (labels < vocab_start + rows)
    local = torch.where(here, labels - vocab_start, torch.zeros_like(labels))
    return torch.where(valid, local, torch.full_like(labels, ignore_index)), here, valid


def _forward(hidden, weight, labels, weights, ref_logprobs, positions, objective, params, ignore_index, chunk_rows,
             fp32_grad_weight, group, vocab_start, vocab, grad_hidden_wanted, grad_weight_wanted):
    """(loss [N], logprobs [N], grad_hidden partial | None, grad_weight shard | None) of the summed loss."""
    n, rows = hidden.shape[0], weight.shape[0]
    dt = _stat_dtype(hidden)
    h_all, w = hidden.contiguous(), weight.contiguous()
    y_all, here_all, valid_all = _local_labels(labels.to(torch.long), vocab_start, rows, ignore_index)
    lp = torch.zeros(n, dtype=dt, device=hidden.device)
    gh = torch.empty_like(h_all) if grad_hidden_wanted else None
    wide = fp32_grad_weight and w.dtype in (torch.bfloat16, torch.float16)
    gw = (torch.zeros(w.shape, dtype=torch.float32, device=w.device) if wide else torch.zeros_like(w)) \
        if grad_weight_wanted else None
    chunk = max(1, min(n, chunk_rows if chunk_rows > 0 else max(1, _CHUNK_BYTES // (rows * 4))))
    zbuf = h_all.new_empty((chunk, rows)) if n else None
    loss = torch.zeros(n, dtype=dt, device=hidden.device)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        h, y, here, valid = h_all[s:s + m], y_all[s:s + m], here_all[s:s + m], valid_all[s:s + m]
        z = zbuf[:m]
        torch.mm(h, w.t(), out=z)
        _, lse_here = _ops.token_logprobs(z, y, ignore_index)  # float64, 0 at ignored rows
        first = z[:, 0].to(torch.float64, copy=True)  # column 0 as it was: the stand-in label's softmax term in backward
        label_logit = torch.where(here, z.gather(1, y.clamp_min(0)[:, None])[:, 0].to(torch.float64), 0.0)
        stats = _gather_rows(torch.stack([lse_here, label_logit, here.to(torch.float64)]), group)  # [world, 3, m]
        lse = stats[:, 0].logsumexp(0)
        # a label held by no rank or by two (only possible on CUDA, unchecked) gives NaN, never a wrong number
        l64 = torch.where(stats[:, 2].sum(0) == 1, stats[:, 1].sum(0) - lse, float("nan"))
        l_c = torch.where(valid, l64, 0.0).to(dt)
        loss_c, dloss_c = _ops.token_objective(l_c, labels[s:s + m], _part(weights, s, m), _part(ref_logprobs, s, m),
                                               _part(positions, s, m), objective, params, ignore_index)
        lp[s:s + m], loss[s:s + m] = l_c, loss_c
        if gh is None and gw is None:
            continue
        # z <- dloss (onehot(y) - softmax(z)) on this slice, with the group's lse; rows whose label is on another
        # rank got the stand-in one-hot at column 0: that entry is written again without it
        _ops.token_logprobs_backward_(z, dloss_c, y, lse, ignore_index)
        stand_in = valid & ~here
        z[:, 0] = torch.where(stand_in, -dloss_c.to(torch.float64) * (first - lse).exp(), z[:, 0].to(torch.float64))
        if gh is not None:
            torch.mm(z, w, out=gh[s:s + m])
        if gw is not None:
            if wide:  # one rounding at the end, not one per chunk
                gw.addmm_(z.t().to(torch.float32), h.to(torch.float32))
            else:
                gw.addmm_(z.t(), h)
    return loss, lp, gh, gw


def _part(t: Tensor | None, s: int, m: int) -> Tensor | None:
    return None if t is None else t[s:s + m]


class _VocabParallelLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, *args):
        *fwd, reduce_grad_hidden = args
        ctx.fwd, ctx.reduce, ctx.group = fwd, reduce_grad_hidden, fwd[9]
        loss, lp, gh, gw = _forward(hidden, weight, *fwd, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return keep_sum_grads(ctx, hidden, weight, loss, lp, gh, gw)

    @staticmethod
    def backward(ctx, g_total, _g_loss, _g_lp):
        gh, gw = scaled_sum_grads(ctx, g_total, lambda: _forward(*ctx.saved_tensors, *ctx.fwd, ctx.needs_input_grad[0],
                                                                 ctx.needs_input_grad[1])[2:])
        if gh is not None and ctx.reduce:  # each rank holds the part of dloss/dh from its slice of the vocabulary
            dist.all_reduce(gh, group=ctx.group)
        return gh, gw, *(None,) * (len(ctx.fwd) + 1)


def vocab_parallel_fused_linear_token_loss_sum(
        hidden: Tensor, weight_shard: Tensor, labels: Tensor, objective: str, params: Sequence[float] = (), *,
        group=None, vocab_start: int | None = None, weights: Tensor | None = None,
        ref_logprobs: Tensor | None = None, positions: Tensor | None = None, ignore_index: int = -100,
        chunk_rows: int = 0, fp32_grad_weight: bool = False,
        reduce_grad_hidden: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`safeshape.ops.fused_linear_token_loss_sum` with the head sharded over the vocabulary: ``(sum_t
    loss_t, per-token loss [N], per-token logprobs [N])``, the same on every rank of ``group``; only the sum is
    differentiable.

    ``hidden [N, H]``, ``labels`` (global vocabulary ids) and the per-token inputs are the same on every rank (the
    replicated input of a column-parallel head). ``weight_shard [V_r, H]`` holds rows ``[vocab_start, vocab_start +
    V_r)`` of the head; the ranks' slices must tile the vocabulary (checked). Either pass the plain local shard with
    ``group`` and ``vocab_start``, or a tensor-parallel DTensor head (``Shard(0)`` weight, see
    :func:`tp_vocab_shard`) with neither; its gradient comes back as a DTensor of the same layout.

    Backward: the weight shard's gradient is complete; the hidden gradient is all-reduced over ``group`` so that
    every rank holds the whole of it (``reduce_grad_hidden=False`` leaves this rank's partial sum, for a caller
    whose own backward reduces it, e.g. the reduce-scatter of a sequence-parallel all-gather).
    """
    from torch.distributed.tensor import DTensor

    if isinstance(weight_shard, DTensor):
        shard = tp_vocab_shard(weight_shard)
        if shard is None:
            raise ValueError(f"{_NAME}: weight_shard is a DTensor with placements {weight_shard.placements}, not a "
                             "tensor-parallel vocabulary shard (Shard(0) on one mesh dimension, Replicate on the "
                             "others, not managed by FSDP); gather it, or pass its local rows with group and "
                             "vocab_start")
        if group is not None or vocab_start is not None:
            raise ValueError(f"{_NAME}: weight_shard is a DTensor: its group and vocab_start come from its mesh; do "
                             "not pass them")
        weight_shard, group, vocab_start = shard
    elif vocab_start is None:
        raise ValueError(f"{_NAME}: a plain weight_shard needs vocab_start (its first row's id in the vocabulary) and "
                         "group (the ranks that hold the other rows)")
    if isinstance(hidden, DTensor):  # replicated (or sharded by rows: gathered; its backward splits the gradient)
        hidden = hidden.full_tensor()
    if not dist.is_initialized():
        raise RuntimeError(f"{_NAME}: torch.distributed is not initialised (init_process_group)")
    vocab = _vocab_size(weight_shard, int(vocab_start), group)
    _check_inputs(hidden, weight_shard, labels, vocab, ignore_index)
    if weight_shard.dtype != hidden.dtype:
        raise ValueError(f"{_NAME}: weight_shard ({weight_shard.dtype}) and hidden ({hidden.dtype}) must have the "
                         "same dtype")
    fwd = (labels, weights, ref_logprobs, positions, objective, [float(p) for p in params], ignore_index,
           int(chunk_rows), fp32_grad_weight, group, int(vocab_start), vocab)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight_shard.requires_grad)):
        loss, lp, _, _ = _forward(hidden, weight_shard, *fwd, False, False)
        return loss.sum(), loss, lp
    return _VocabParallelLossSum.apply(hidden, weight_shard, *fwd, reduce_grad_hidden)


def _fsdp_managed(weight: Tensor) -> bool:
    """Whether FSDP2 (``fully_shard``) holds ``weight`` as one of its sharded parameters. Its Shard(0) DTensor looks
    like a tensor-parallel one; FSDP keeps its states in the composable-state registry, module by module."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - a torch without FSDP2's registry: be safe, claim nothing
        return True
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, FSDPState):
            for group in state._fsdp_param_groups:
                if any(p.sharded_param is weight for p in group.fsdp_params):
                    return True
    return False


def tp_vocab_shard(weight: Tensor):
    """``(local rows, process group, vocab_start)`` when ``weight`` is a tensor-parallel vocabulary-sharded head (a
    DTensor ``[V, H]`` with ``Shard(0)`` on one mesh dimension and ``Replicate`` on any other, as
    ``ColwiseParallel(output_layouts=Shard(-1))`` leaves ``lm_head.weight``), else None (a plain tensor, another
    layout, or an FSDP-sharded parameter, whose rows are split the same way but whose ranks hold different
    tokens). The local rows come from ``to_local()``, so their gradient reaches the DTensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(weight, DTensor) or weight.dim() != 2:
        return None
    shard_dims = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or weight.placements[shard_dims[0]].dim not in (0, -2):
        return None
    if type(weight.placements[shard_dims[0]]) is not Shard:  # e.g. FSDP's _StridedShard
        return None
    if not all(isinstance(p, Replicate) for i, p in enumerate(weight.placements) if i != shard_dims[0]):
        return None
    if _fsdp_managed(weight):
        return None
    mesh, dim = weight.device_mesh, shard_dims[0]
    world, rank = mesh.size(dim), mesh.get_local_rank(dim)
    per_rank = -(-weight.shape[0] // world)  # torch.chunk's split, as Shard(0) uses
    return weight.to_local(), mesh.get_group(dim), min(rank * per_rank, weight.shape[0])
