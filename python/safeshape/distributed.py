"""Process group set-up for ``torchrun`` (gloo on CPU, nccl on CUDA) and the few collectives that train, eval and
star need (:class:`Dist`, :func:`on_main`); below every command, so none imports another's module for them.

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

from .errors import SafeshapeError

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


def on_main(d: Dist, fn):
    """Run ``fn`` on process 0 and share its result (or its error, of any type) with every process: all raise
    together rather than the others waiting forever in the next collective."""
    res, exc = None, None
    if d.is_main:
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
            exc = e
    if not d.all_ok(exc is None):
        if exc is not None:
            raise exc
        raise SafeshapeError("process 0 failed (its error is printed there)")
    return d.gather_objects(res)[0]


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
