"""Sharded training (``--fsdp``: FSDP2 per decoder layer + the root, accelerate's FSDP environment) and the
gathering of sharded states for checkpoints. The process group itself (:class:`Dist`, :func:`setup`, the
launchers' environments) is :mod:`safeshape.distributed`, re-exported here for code that imported it from here."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed import (ACCELERATE_VARS, MPI_VARS, Dist, is_dtensor, launcher_ranks, on_main,  # noqa: F401
                           resolve_device, setup)
from ..errors import SafeshapeError


# --- sharded training (--fsdp) ---------------------------------------------------------------------------------

_TRUE = ("true", "1", "yes")


@dataclass
class FsdpLaunch:
    """What an ``accelerate launch`` FSDP config asks of ``safeshape train`` (the parts it honours)."""

    layer_classes: tuple[str, ...] = ()  # FSDP_TRANSFORMER_CLS_TO_WRAP (default: the model's _no_split_modules)
    activation_checkpointing: bool = False  # FSDP_ACTIVATION_CHECKPOINTING


def accelerate_fsdp(env=None) -> FsdpLaunch | None:
    """The FSDP settings ``accelerate launch`` exported (``ACCELERATE_USE_FSDP=true`` and its ``FSDP_*``), or ``None``.

    ``safeshape train`` shards with FSDP2 ``fully_shard`` per decoder layer and the root, which is accelerate's
    FULL_SHARD with TRANSFORMER_BASED_WRAP (FSDP_VERSION 1 or 2 alike): settings it cannot honour (other sharding
    strategies, CPU offload, other wrap policies, no resharding after forward) are refused, as are accelerate's
    DeepSpeed, Megatron-LM and tensor/context-parallel configs, instead of being ignored."""
    env = os.environ if env is None else env
    for var, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"),
                      ("ACCELERATE_USE_PARALLELISM_CONFIG", "a tensor/context-parallel (parallelism_config)")):
        if env.get(var, "").lower() in _TRUE:
            raise SafeshapeError(
                f"accelerate launch runs {what} config ({var}=true), which safeshape train does not run: use an "
                "FSDP config (or torchrun ... -m safeshape train --fsdp); a DeepSpeed/Megatron stack can call the "
                "loss through safeshape.hf in its own Trainer")
    if env.get("ACCELERATE_USE_FSDP", "").lower() not in _TRUE:
        return None

    def refuse(var: str, why: str) -> SafeshapeError:
        return SafeshapeError(f"accelerate launch FSDP config: {var}={env[var]}: {why}; safeshape train shards with "
                              "FSDP2 fully_shard per decoder layer and the root (FULL_SHARD, TRANSFORMER_BASED_WRAP)")

    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    if strategy.upper() not in ("FULL_SHARD", "1"):
        raise refuse("FSDP_SHARDING_STRATEGY", "only FULL_SHARD is run (set fsdp_sharding_strategy: FULL_SHARD, or "
                                               "fsdp_reshard_after_forward: true with fsdp_version 2)")
    if env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in _TRUE:
        raise refuse("FSDP_RESHARD_AFTER_FORWARD", "the decoder layers are always resharded after forward")
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE:
        raise refuse("FSDP_OFFLOAD_PARAMS", "CPU offload of the parameters is not run (set fsdp_offload_params: "
                                            "false, or quantize the base with --load-in-4bit)")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy.upper() != "TRANSFORMER_BASED_WRAP":
        raise refuse("FSDP_AUTO_WRAP_POLICY", "only TRANSFORMER_BASED_WRAP (the decoder layers as units) is run")
    if env.get("FSDP_VERSION", "2") not in ("1", "2"):
        raise refuse("FSDP_VERSION", "only versions 1 and 2 exist")
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return FsdpLaunch(layer_classes=classes,
                      activation_checkpointing=env.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() in _TRUE)


def decoder_layers(model: torch.nn.Module, class_names: tuple[str, ...] = ()) -> list[torch.nn.Module]:
    """The modules that become FSDP units: those whose class is named in ``class_names`` or, by default, in the
    transformers model's ``_no_split_modules`` (its decoder layer class, as accelerate's TRANSFORMER_BASED_WRAP)."""
    names = set(class_names)
    if not names:
        for m in model.modules():
            names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        where = "FSDP_TRANSFORMER_CLS_TO_WRAP" if class_names else "the model's _no_split_modules"
        raise SafeshapeError(f"--fsdp: no module of the classes {sorted(names)} ({where}) in the model; cannot "
                             "shard it per decoder layer")
    return layers


def shard_fsdp(root: torch.nn.Module, layers: list[torch.nn.Module], device: torch.device) -> None:
    """FSDP2 ``fully_shard`` over all processes: each decoder layer a unit, then ``root`` (in place).

    The root unit holds what is left (embeddings, final norm, output head): FSDP2 does not reshard the root after
    its forward, so the head's weight is a plain unsharded tensor from the root's forward until its backward,
    which is when the fused loss reads it. A unit may mix a bfloat16 base with float32 LoRA weights (FSDP2 wants
    one dtype among the trainable parameters of a unit only)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every process calls it), else ``t``, detached on CPU."""
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu()


def full_state_dict(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``named`` with every sharded tensor gathered (same order on every process: it is a sequence of collectives)."""
    return {name: full_tensor(t) for name, t in named.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with its sharded moments gathered: the layout a one-process run saves, so a
    checkpoint of a sharded run resumes in either kind of run."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in sorted(state["state"].items())}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a full (one-process layout) state into an optimizer of sharded parameters: each
    moment becomes a DTensor laid out as its parameter."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if is_dtensor(p) and isinstance(v, torch.Tensor) and not is_dtensor(v) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def fsdp_gradient_sync(module: torch.nn.Module, enabled: bool):
    """Context: FSDP2's reduce-scatter of gradients on (``enabled``) or deferred to a later micro-batch."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    return ctx()
