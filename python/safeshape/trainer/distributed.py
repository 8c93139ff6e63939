"""Process group set-up for ``torchrun`` (gloo on CPU, nccl on CUDA) and the few collectives the loop needs.
A single process without torchrun's environment runs without a process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SafeshapeError


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


def setup(device: str) -> Dist:
    """Join the process group torchrun describes (or one the caller already initialised)."""
    want_cuda = device.startswith("cuda")
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        rank, world, owns = dist.get_rank(), dist.get_world_size(), True
    else:
        rank, world, owns = 0, 1, False
    local_rank = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
    if want_cuda:
        if not torch.cuda.is_available():
            raise SafeshapeError(f"--device {device}: CUDA is not available in this torch/machine")
        dev = torch.device(device if (":" in device and world == 1) else f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns, device=dev)
