"""torch.distributed plumbing for `torchrun`: process-group setup (nccl on CUDA, gloo on CPU),
sharding an index set across ranks, gathering per-rank numpy results, broadcasting from rank 0.
A single process (no torchrun) gets a context with world_size 1 and every helper is a no-op."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. rank 0 selects and writes every output."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistContext, str]:
    """Joins the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
    once per process. Returns the context and this rank's device ('cuda' becomes 'cuda:LOCAL_RANK')."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
        device = f"cuda:{ctx.local_rank}"
    return ctx, device


def shard(indices: np.ndarray, ctx: DistContext) -> np.ndarray:
    """This rank's contiguous share of `indices` (shares differ in length by at most one, and
    concatenated in rank order they give `indices` back)."""
    if not ctx.enabled:
        return indices
    return np.array_split(np.asarray(indices), ctx.world_size)[ctx.rank]


def gather_concat(arrays: tuple[np.ndarray, ...], ctx: DistContext) -> tuple[np.ndarray, ...]:
    """Every rank's arrays, concatenated in rank order, on every rank."""
    if not ctx.enabled:
        return arrays
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(len(arrays)))


def broadcast(value: object, ctx: DistContext) -> object:
    """rank 0's `value` on every rank (any picklable object)."""
    if not ctx.enabled:
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
