"""torch.distributed set-up for training under `torchrun`, and a no-op without it.

    torchrun --nproc_per_node 2 -m cli.main train public --profile tiny

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; we then join a process group (nccl on
GPUs, gloo on CPU) and wrap the model in DDP. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexolmo.model.device import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Join the process group if launched by torchrun (idempotent); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def run_device(d: Dist, name: str) -> torch.device:
    """Where a run computes: `name` ("cpu", "cuda", "auto"; flexolmo/model/device.py
    `resolve_device`, which refuses cuda without a GPU), except under torchrun, where each rank
    keeps its own device (`setup`: its GPU when there are GPUs) as before."""
    device = resolve_device(name)
    return d.device if d.enabled else device


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def mean(d: Dist, value: float) -> float:
    """The mean of a float over all processes."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world_size


def wrap(d: Dist, model):
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
