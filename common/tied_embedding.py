"""The gradient of an input embedding tied to the output projection (DistilBERT, BERT, RoBERTa, GPT-2 share one
vocabulary x hidden matrix), added into the projection's gradient instead of made whole on its own.

Autograd gives the tied matrix two gradients: the chunked losses' (common.fused_loss: vocabulary x hidden, dense)
and the lookup's, which embedding_dense_backward makes as a zero-filled vocabulary x hidden matrix with a few
hundred rows set; the engine then adds the two into a third (out of place: the loss's gradient is not the
engine's alone to reuse). On 2 cores of an AMD EPYC (Zen 4), at issue #10's settings, the lookup's backward took
10-15 ms and the add 23-32 ms of a micro-batch of about 450 ms, mostly page faults of fresh 45 MiB matrices
(3,200 faults per backward before, 480 after).

Within `tied_gradient(model)` the lookup and the loss share a Slot: the loss's backward, which autograd runs
first (the lookup feeds it), leaves there the gradient it hands the engine for the matrix, and the lookup's
backward adds its rows into that very tensor (index_add_) and hands the engine nothing; the engine sums nothing
and the matrix's AccumulateGrad sees the one tensor. Where the slot is empty (the loss made no gradient for the
matrix) the lookup's backward is the stock one."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed import unwrap_ddp


class Slot:
    """The loss's gradient for the tied matrix, left by its backward for the lookup's (None: none made)."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


class TiedLookup(torch.autograd.Function):
    """weight[ids] (as F.embedding), its weight gradient added into `slot.grad` where the loss left one."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, slot: Slot
                ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.slot, ctx.rows = padding_idx, slot, weight.shape[0]
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        (ids,) = ctx.saved_tensors
        target, ctx.slot.grad = ctx.slot.grad, None
        padding = -1 if ctx.padding_idx is None else ctx.padding_idx
        if target is None:
            return None, torch.ops.aten.embedding_dense_backward(grad_out, ids, ctx.rows, padding, False), None, None
        flat = ids.reshape(-1)
        rows = grad_out.reshape(-1, grad_out.shape[-1]).to(target.dtype)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
            rows = rows * (flat != ctx.padding_idx).unsqueeze(-1).to(rows.dtype)
        target.index_add_(0, flat, rows)
        return None, None, None, None


class TiedEmbedding(nn.Embedding):
    """nn.Embedding whose lookup goes through TiedLookup while a slot is open (`tied_gradient`)."""

    slot: Slot | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.slot is None or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return super().forward(ids)
        return TiedLookup.apply(ids, self.weight, self.padding_idx, self.slot)


def _tied_input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's input embedding when it is a plain lookup (no max_norm, no frequency scaling, dense) on the
    CPU whose matrix is the output projection's."""
    inner = unwrap_ddp(model)
    get_in, get_out = getattr(inner, "get_input_embeddings", None), getattr(inner, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    emb, out = get_in(), get_out()
    if type(emb) not in (nn.Embedding, TiedEmbedding) or out is None or emb.weight is not out.weight:
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse or emb.weight.device.type != "cpu":
        return None
    return emb


@contextlib.contextmanager
def tied_gradient(model: nn.Module) -> Iterator[Slot | None]:
    """Within the block the model's tied input embedding (if any: else None is yielded) looks up through a new
    Slot, yielded for the loss (common.fused_loss) to leave its gradient for the matrix in. The graph built
    within keeps the slot: backward may run after the block."""
    emb = _tied_input_embedding(model)
    if emb is None:
        yield None
        return
    emb.__class__ = TiedEmbedding
    emb.slot = slot = Slot()
    try:
        yield slot
    finally:
        emb.slot = None
