"""Batch sources: what a script feeds the shared loop.

A batch source says how many batches each rank takes per epoch, which examples go into each (a pure function
of the seed and the epoch, so a resumed run sees the very batches an uninterrupted one would), and how a list
of examples becomes a batch of tensors on the device (collation, padding, masking: the data's job, not the
loss step's). The default, `TensorBatches`, is a seeded shuffle of a dict of padded tensors with dynamic
padding; distillation has its own (length-grouped sequences, masked for MLM).
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol, Sequence

import torch

from common.distributed import DistContext

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    num_examples: int

    def batches_per_epoch(self, ctx: DistContext) -> int:
        """Batches each rank takes in one epoch (every rank the same number)."""

    def epoch(self, epoch: int, ctx: DistContext) -> Sequence[Sequence[int]]:
        """This rank's batches (example indices) for `epoch`: a pure function of the seed and the epoch."""

    def collate(self, indices: Sequence[int], device: torch.device) -> Batch:
        """The batch of these examples, on `device`."""


def dataset_size(dataset: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(dataset.values())))


def per_rank_batches(n: int, batch_size: int, world_size: int) -> int:
    """Batches per rank and epoch when n examples are shared out as `epoch_batches` does."""
    return math.ceil(math.ceil(n / world_size) / batch_size)


def rank_permutation(n: int, seed: int, epoch: int, ctx: DistContext) -> list[int]:
    """This rank's share of a permutation seeded by (seed, epoch): padded by wrapping so that every rank takes
    the same number of examples (as torch's DistributedSampler), then split by rank (rank r takes r, r+W, ...)."""
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    if ctx.world_size > 1:
        total = math.ceil(n / ctx.world_size) * ctx.world_size
        perm = (perm * math.ceil(total / max(n, 1)))[:total]
        perm = perm[ctx.rank :: ctx.world_size]
    return perm


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, ctx: DistContext) -> list[list[int]]:
    """This rank's batches for one epoch: `rank_permutation` cut into batches. The union of the ranks' i-th
    batches is the i-th batch of a single process with a world_size times larger batch."""
    perm = rank_permutation(n, seed, epoch, ctx)
    return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]


def make_batch(
    dataset: Mapping[str, torch.Tensor], indices: Sequence[int], device: torch.device, dynamic_padding: bool
) -> Batch:
    """Gather rows into a batch on `device`; with dynamic padding, trim [B, S] tensors to the longest row."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    batch = {k: v.index_select(0, idx) for k, v in dataset.items()}
    if dynamic_padding and "attention_mask" in batch and len(idx):
        mask = batch["attention_mask"]
        seq_len = mask.shape[1]
        used = mask.bool().any(dim=0).nonzero().flatten()
        first, last = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, seq_len)
        if last - first < seq_len:
            # The span of columns holding any real token: right- and left-padded features alike.
            batch = {k: (v[:, first:last] if v.dim() == 2 and v.shape[1] == seq_len else v) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TensorBatches:
    """The default batch source: a dict of equally long tensors (padded features), shuffled per epoch by
    (seed, epoch), batches trimmed to their longest row unless `dynamic_padding` is off."""

    def __init__(self, dataset: Mapping[str, torch.Tensor], batch_size: int, seed: int = 42,
                 dynamic_padding: bool = True) -> None:
        self.dataset, self.batch_size, self.seed, self.dynamic_padding = dataset, batch_size, seed, dynamic_padding
        self.num_examples = dataset_size(dataset)

    def batches_per_epoch(self, ctx: DistContext) -> int:
        return per_rank_batches(self.num_examples, self.batch_size, ctx.world_size)

    def epoch(self, epoch: int, ctx: DistContext) -> list[list[int]]:
        return epoch_batches(self.num_examples, self.batch_size, self.seed, epoch, ctx)

    def collate(self, indices: Sequence[int], device: torch.device) -> Batch:
        return make_batch(self.dataset, indices, device, self.dynamic_padding)
