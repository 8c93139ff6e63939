"""Process group set-up for ``torchrun`` (gloo on CPU, nccl on CUDA) and the few collectives the loop needs.

Launchers are recognised by their environment: torchrun and ``accelerate launch --multi_gpu`` (which runs
torchrun) set ``WORLD_SIZE``/``RANK``; MPI (``accelerate launch --mpirun_hostfile``, ``mpirun``) sets its own rank
variables. ``accelerate launch`` without either (``--cpu``, or no ``--multi_gpu``) starts ONE process even when
asked for several; that is refused rather than silently training alone. A single process without any launcher
runs without a process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SafeshapeError

# (world size, rank, local rank) variables of MPI launchers: Open MPI, MPICH / Intel MPI (PMI), MVAPICH
MPI_VARS = (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
            ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"))
# set by every `accelerate launch`, whichever launcher it uses
ACCELERATE_VARS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")


def launcher_ranks(env=None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the launcher's environment, ``None`` for a plain single process.

    Raises :class:`SafeshapeError` for ``accelerate launch`` asked for several processes that started one."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:  # torchrun, or accelerate's torchrun-based launchers
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        return rank, world, int(env.get("LOCAL_RANK", rank))
    for size, rank, local in MPI_VARS:
        if size in env:
            return int(env[rank]), int(env[size]), int(env.get(local, env[rank]))
    if any(v in env for v in ACCELERATE_VARS) and "MASTER_ADDR" in env:
        # accelerate's simple launcher exports MASTER_ADDR only when --num_processes > 1 (or several machines)
        raise SafeshapeError(
            "accelerate launch started a single process although several were asked for (its simple launcher does "
            "that with --cpu, or without --multi_gpu): training alone would give world size 1 and other losses. "
            "On GPUs: accelerate launch --multi_gpu --num_processes N -m safeshape train --device cuda ...; "
            "on CPU: torchrun --nproc_per_node N -m safeshape train --device cpu ...")
    return None


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes of a float64 vector (float64 so counts and sums stay exact)."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device).clone()
        if self.enabled:
            dist.all_reduce(t)
        return t

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_ok(self, ok: bool) -> bool:
        """True when every process reports ok (so all raise together instead of one hanging in a collective)."""
        return bool(self.sum([0.0 if ok else 1.0]).item() == 0) if self.enabled else ok

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when a CUDA device is available, else ``cpu``; other names are kept."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def setup(device: str) -> Dist:
    """Join the process group the launcher describes (or one the caller already initialised)."""
    device = resolve_device(device)
    want_cuda = device.startswith("cuda")
    ranks = None
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
        ranks = launcher_ranks() if "WORLD_SIZE" in os.environ else None
    elif (ranks := launcher_ranks()) is not None and ranks[1] > 1:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise SafeshapeError(f"{ranks[1]} processes were launched without MASTER_ADDR and MASTER_PORT: set them "
                                 "to the address and a free port of the rank-0 machine")
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", rank=ranks[0], world_size=ranks[1])
        rank, world, owns = dist.get_rank(), dist.get_world_size(), True
    else:
        rank, world, owns = 0, 1, False
    local_rank = ranks[2] if ranks else (rank if world > 1 else 0)
    if want_cuda:
        if not torch.cuda.is_available():
            raise SafeshapeError(f"--device {device}: CUDA is not available in this torch/machine")
        dev = torch.device(device if (":" in device and world == 1) else f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns, device=dev)


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


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


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
