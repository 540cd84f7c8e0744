"""Distributed setup from the torchrun environment, rank-0-first data preparation, and exact gathering.

Single process: `python scripts/x.py ...`. Several processes: `torchrun --nproc_per_node=N scripts/x.py ...`
(torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). The old `torch.distributed.launch` passed
`--local_rank=K` (newer versions `--local-rank=K`); both are accepted and only fill in LOCAL_RANK.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: device, global rank, local rank and world size."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(no_cuda: bool = False, local_rank: int = -1, timeout_minutes: int = 30) -> DistContext:
    """Read the torchrun environment, join the process group (NCCL on GPUs, Gloo on CPU) and pick the device.

    Idempotent: a second call in the same process reuses the existing group. `local_rank` is the value of the
    legacy `--local_rank` flag; the environment wins where both are set.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    env_local = os.environ.get("LOCAL_RANK")
    local = int(env_local) if env_local is not None else max(local_rank, 0)
    use_cuda = torch.cuda.is_available() and not no_cuda
    if world_size <= 1 and local_rank < 0:
        device = torch.device("cuda" if use_cuda else "cpu")
        return DistContext(device=device)
    if world_size <= 1:
        # A legacy launcher that set only --local_rank: treat as single process on that GPU.
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return DistContext(device=device, local_rank=local)
    if use_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(device=device, rank=dist.get_rank(), local_rank=local, world_size=dist.get_world_size())


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The model a DistributedDataParallel wrapper holds (the model itself when it is not wrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cleanup_distributed() -> None:
    """Tear the process group down (call in `finally`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), then the others run it (and read the cache).

    If rank 0 raises inside the block, it still reaches the matching barrier, so the other ranks are released
    instead of hanging; they then fail on their own (missing cache) or finish, and rank 0 re-raises its error.
    """
    if not ctx.is_distributed:
        yield
        return
    if ctx.is_main:
        try:
            yield
        finally:
            barrier()
    else:
        barrier()
        yield


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list when not distributed)."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(n: int, ctx: DistContext) -> list[int]:
    """This rank's share of `range(n)`: every index exactly once over all ranks, no padding or duplicates.

    (torch's DistributedSampler pads the last shard by repeating examples, which would count some twice in
    the metrics.)
    """
    return list(range(ctx.rank, n, ctx.world_size))


def all_reduce_max(value: float, ctx: DistContext) -> float:
    """The largest `value` over ranks (e.g. wall time of the slowest rank)."""
    if not ctx.is_distributed:
        return value
    return max(all_gather_objects(value, ctx))
