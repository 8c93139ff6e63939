"""The fused lm-head loss reaches the head's weight however a training stack holds it.

A fused loss reads ``lm_head.weight`` outside the head's own forward, where sharding schemes hand out something
else than the ``[V, H]`` matrix (shared/STACKS.md):

==================  ============================================  ============================================
stack               ``lm_head.weight`` after the model's forward  what :func:`fused_linear_token_loss_sum` does
==================  ============================================  ============================================
plain, DDP          the parameter                                 calls the op on it
FSDP1               a flat-parameter view: full, or (with         uses a full, live view as it is; else gathers
                    ``use_orig_params=True``) the rank's 1-D      it read-only (``summon_full_params`` of the unit
                    slice                                         that owns it) for a frozen head
FSDP2               a ``Shard(0)`` DTensor                        ``full_tensor()`` with ``Partial("avg")``
                                                                  gradients: a trainable head's gradient is
                                                                  reduce-scattered onto the shards (FSDP's mean)
ZeRO-3              a ``(0,)`` placeholder (``ds_id``)            a frozen head gathered read-only
                                                                  (``GatheredParameters``) for the call
tensor parallel     a DTensor not managed by FSDP                 the vocabulary-parallel loss (``vocab.py``)
==================  ============================================  ============================================

Anything else (a trainable head under ZeRO-3 or as an FSDP1 shard, a bare DTensor whose owner is unknown, other
placements) is refused with a message that names the layout and what to do. Gathering inside the call is safe
because the op forms its gradients in its forward (the backward only scales them): the gathered weight is not
read again after the call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import SafeshapeError

__all__ = ["fused_linear_token_loss_sum", "gathered", "head_module", "head_layout"]


def _wrappers_and_model(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The wrappers around a transformers model (DDP, FSDP1, a DeepSpeed engine: ``.module``; PEFT: the base model)
    and the model itself."""
    chain = [model]
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
        chain.append(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
        chain.append(model)
    return chain, model


def head_module(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """``(output head, modules from the outermost wrapper down to the head)`` of a (wrapped) causal LM, or of a
    head module itself."""
    chain, inner = _wrappers_and_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    if get is None:
        if not isinstance(getattr(inner, "weight", None), Tensor):
            raise SafeshapeError(f"safeshape.parallel.head: {type(inner).__name__} is neither a model with "
                                 "get_output_embeddings() nor a module with a weight")
        return inner, chain
    head = get()
    path = next((n for n, m in inner.named_modules() if m is head), None)
    if head is None or path is None:
        raise SafeshapeError(f"safeshape.parallel.head: {type(inner).__name__}.get_output_embeddings() gives no "
                             "module of the model")
    owners = [inner.get_submodule(".".join(path.split(".")[:i])) for i in range(1, path.count(".") + 1)]
    return head, chain + owners + [head]


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def _fsdp1_units(modules: Sequence[nn.Module]) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return []
    return [m for m in modules if isinstance(m, FullyShardedDataParallel)]


def _fsdp2_managed(modules: Sequence[nn.Module]) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in modules)


def _zero3(t: Tensor) -> bool:
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


def _describe(t: Tensor) -> str:
    if _is_dtensor(t):
        return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"
    return f"a {type(t).__name__} of shape {tuple(t.shape)}"


def head_layout(head: Tensor | nn.Module) -> str:
    """How the head's weight is held: ``plain``, ``fsdp1`` (a flat-parameter view that is not the live ``[V, H]``
    matrix), ``fsdp2``, ``zero3``, ``dtensor`` (not FSDP-managed: tensor parallel) or ``unknown``."""
    if isinstance(head, nn.Module):
        module, modules = head_module(head)
        weight = module.weight
    else:
        weight, modules = head, []
    if _zero3(weight):
        return "zero3"
    if _is_dtensor(weight):
        if _fsdp2_managed(modules):
            return "fsdp2"
        return "dtensor" if modules else "unknown"
    if weight.dim() == 2 and weight.untyped_storage().size() > 0:  # (a 2-D view a reshard freed: an FSDP1 shard)
        return "plain"
    if _fsdp1_units(modules):
        return "fsdp1"
    return "unknown"


@contextlib.contextmanager
def _zero3_gathered(weight: Tensor) -> Iterator[Tensor]:
    if weight.requires_grad and torch.is_grad_enabled():
        raise SafeshapeError(
            "safeshape: the lm_head weight is partitioned by DeepSpeed ZeRO-3 and trainable; the fused loss reads it "
            "gathered outside the head's forward, where ZeRO-3 cannot take a [V, H] gradient back onto its "
            "partition. Freeze the head (LoRA leaves it frozen: do not list lm_head in modules_to_save or "
            "target_modules), or train it under ZeRO-2 or FSDP2")
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield weight.detach()  # frozen; a plain alias (no ds_id) that a nested call does not gather again


@contextlib.contextmanager
def _fsdp1_gathered(head: nn.Module, modules: Sequence[nn.Module]) -> Iterator[Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if head.weight.requires_grad and torch.is_grad_enabled():
        raise SafeshapeError(
            f"safeshape: the lm_head weight is {_describe(head.weight)}, an FSDP1 shard outside the forward "
            "(use_orig_params=True), and trainable; gathered outside the forward it cannot take its gradient back "
            "to the flat parameter. Freeze the head (LoRA leaves it frozen), use FSDP1 with use_orig_params=False, "
            "or FSDP2")
    owner = _fsdp1_units(modules)[-1]  # the innermost unit on the path to the head holds its flat parameter
    with FullyShardedDataParallel.summon_full_params(owner, recurse=False, writeback=False):
        yield head.weight.detach()  # frozen


@contextlib.contextmanager
def _weight_for_call(head: Tensor | nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    """``("local", [V, H] tensor)`` or ``("vocab", (shard, group, vocab_start))`` for the duration of one call."""
    layout = head_layout(head)
    module, modules = head_module(head) if isinstance(head, nn.Module) else (None, [])
    weight = module.weight if module is not None else head
    if layout == "plain":
        yield "local", weight
    elif layout == "zero3":
        with _zero3_gathered(weight) as w:
            yield "local", w
    elif layout == "fsdp1":
        with _fsdp1_gathered(module, modules) as w:
            yield "local", w
    elif layout == "fsdp2":
        mesh = weight.device_mesh
        if mesh.ndim != 1:
            raise SafeshapeError(f"safeshape: the lm_head weight is {_describe(weight)}: FSDP2 over a {mesh.ndim}-D "
                                 "mesh (FSDP with tensor parallelism) is not handled; shard the head over one mesh "
                                 "dimension")
        from torch.distributed.tensor import Partial

        # the gradient of each rank's own batch, averaged over ranks and scattered onto the shards, as FSDP2 reduces
        # the gradients of its other parameters
        full = weight.full_tensor(grad_placements=[Partial("avg")])
        yield "local", full if full.dtype == dtype else full.to(dtype)
    elif layout == "dtensor":
        from . import vocab

        shard = vocab.tp_vocab_shard(weight)
        if shard is None:
            raise SafeshapeError(f"safeshape: the lm_head weight is {_describe(weight)}, not managed by FSDP and not "
                                 "a vocabulary-sharded tensor-parallel head (weight Shard(0), logits Shard(-1)); "
                                 "the fused loss handles no other layout")
        yield "vocab", shard
    elif _is_dtensor(weight):
        raise SafeshapeError(f"safeshape: the lm_head weight is {_describe(weight)}; pass the head module or the "
                             "model instead of its weight, so that an FSDP2 shard (gathered for the call) is told from "
                             "a tensor-parallel vocabulary shard (vocabulary-parallel loss)")
    else:
        raise SafeshapeError(f"safeshape: the lm_head weight is {_describe(weight)}, not the [vocab, hidden] matrix, "
                             "and its layout is not one the fused loss knows (plain, FSDP1, FSDP2, DeepSpeed ZeRO-3, "
                             "tensor parallel). Pass the model (or the head module) so its wrappers can be seen, or "
                             "call the loss inside the head's forward where the weight is whole")


@contextlib.contextmanager
def gathered(head: Tensor | nn.Module, dtype: torch.dtype) -> Iterator[Tensor | nn.Module]:
    """For several fused calls on one head (a reference pass and the policy's loss): the weight gathered once, as a
    plain ``[V, H]`` tensor, for the duration of the block; the head itself where nothing is gathered (tensor
    parallel). Every rank must enter it."""
    with _weight_for_call(head, dtype) as (kind, w):
        yield w if kind == "local" else head


def fused_linear_token_loss_sum(hidden: Tensor, head: Tensor | nn.Module, labels: Tensor, objective: str,
                                params: Sequence[float] = (), *, weights: Tensor | None = None,
                                ref_logprobs: Tensor | None = None, positions: Tensor | None = None,
                                ignore_index: int = -100, chunk_rows: int = 0,
                                fp32_grad_weight: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`safeshape.ops.fused_linear_token_loss_sum` with ``head`` = the lm-head weight, the head module, or the
    (wrapped) model, however the stack holds the weight (see the module docstring). Every rank must call it (the
    gathers are collective)."""
    kw = dict(weights=weights, ref_logprobs=ref_logprobs, positions=positions, ignore_index=ignore_index,
              chunk_rows=chunk_rows, fp32_grad_weight=fp32_grad_weight)
    if torch.compiler.is_compiling() and isinstance(head, Tensor):  # torch.compile traces a plain weight
        return ops.fused_linear_token_loss_sum(hidden, head, labels, objective, params, **kw)
    with _weight_for_call(head, hidden.dtype) as (kind, w):
        if kind == "local":
            return ops.fused_linear_token_loss_sum(hidden, w, labels, objective, params, **kw)
        from . import vocab

        shard, group, vocab_start = w
        return vocab.vocab_parallel_fused_linear_token_loss_sum(hidden, shard, labels, objective, params,
                                                                group=group, vocab_start=vocab_start, **kw)
