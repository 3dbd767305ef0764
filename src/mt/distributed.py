"""Data-parallel training on PyTorch's own engine: `torchrun --nproc_per_node N -m mt train ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup()` then joins the process group (NCCL on GPUs, Gloo on
CPUs). Every rank builds the same list of batches from the same seed and takes its own share of each step's
batches; gradients are averaged by DistributedDataParallel. Rank 0 alone writes files, logs and validates,
and decides when to stop, so that every rank leaves the loop at the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """This process's place among torchrun's: its rank, the number of ranks, and its GPU on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup() -> Context:
    """Joins the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def sum_all(ctx: Context, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks."""
    if not ctx.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(ctx: Context, value: object) -> object:
    """Rank 0's `value`, on every rank."""
    if not ctx.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
