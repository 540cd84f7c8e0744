"""The distillation losses computed through the output projection in chunks of tokens, so that no tensor of
vocabulary size exists for a whole micro-batch (the idea of Liger Kernel's fused linear cross-entropy and of
Cut Cross-Entropy, written for the DistilBERT loss mix).

The models run with their output projection taken out (`projection_removed`): they return the hidden states
that would enter it. `FusedDistillationLoss` then walks over chunks of token rows; for each it makes the
student's logits (and the teacher's, from the teacher's hidden states and projection), adds the chunk's share of
every loss term, and at once the chunk's gradient with respect to the student's hidden states, projection weight
and bias. The forward pass thus does the backward work of the projection; the backward pass only scales the
stored gradients by the incoming gradient (the accumulation divisor, a grad scaler's scale).

Semantics equal common.distillation's straightforward functions on full logits (tested to fp32 tolerance):
- soft cross-entropy: KL(teacher || student) at temperature T, times T^2, averaged over the `rows` positions;
- LM cross-entropy: averaged over positions with a target (-100: none); a causal LM's target at t is the label
  at t + 1 (`lm_targets`);
- logit MSE: squared differences summed over the vocabulary, averaged over the `rows` positions.
A term whose positions are all absent is 0 with a zero gradient. All arithmetic on logits is float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common import cpu_matmul
from common.distributed import unwrap_ddp
from common.tied_embedding import Slot

# Bytes of vocabulary-sized float32 temporaries one chunk may hold (four tensors of chunk x vocabulary), and
# rows in whole multiples of CHUNK_ROW_MULTIPLE: at a vocabulary of 30,522 on 2 threads the 137 rows this
# target gave unrounded ran the vocabulary products about 18% slower than 128; 256 rows (a 128 MiB target) were
# faster for the loss alone but made whole distillation steps 0.89x as fast as 128 (the rest of the step loses
# the caches).
CHUNK_MEMORY_TARGET = 64 * 2**20
TENSORS_PER_ROW = 4
CHUNK_ROW_MULTIPLE = 64


@dataclass(frozen=True)
class LossWeights:
    """The weights of the vocabulary-sized terms (the soft cross-entropy, the LM cross-entropy, the logit MSE)
    and the softmax temperature of the first."""

    ce: float = 0.0
    lm: float = 0.0
    mse: float = 0.0
    temperature: float = 1.0

    @property
    def needs_teacher(self) -> bool:
        return self.ce > 0 or self.mse > 0


def chunk_rows(vocab_size: int, override: int | None = None) -> int:
    """Token rows per chunk: `override` when given, else as many as CHUNK_MEMORY_TARGET allows, rounded down to
    a multiple of CHUNK_ROW_MULTIPLE (when that many fit)."""
    if override is not None:
        return max(1, int(override))
    rows = max(1, CHUNK_MEMORY_TARGET // (TENSORS_PER_ROW * 4 * max(1, vocab_size)))
    return rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE or rows


def output_projection(model: nn.Module) -> nn.Linear:
    """The model's output projection (the vocabulary decoder, tied to the input embeddings where the model ties
    them), through a DistributedDataParallel wrapper."""
    inner = unwrap_ddp(model)
    projection = inner.get_output_embeddings()
    if not isinstance(projection, nn.Linear):
        raise TypeError(f"{type(inner).__name__} has no linear output projection")
    return projection


@contextlib.contextmanager
def projection_removed(model: nn.Module) -> Iterator[nn.Linear]:
    """Within the block the model's output projection is an identity: its forward returns, as `logits`, the
    hidden states that enter the projection (after any head transform). Yields the projection."""
    projection = output_projection(model)
    inner = unwrap_ddp(model)
    owner, name = next((m, n) for m in inner.modules() for n, child in m.named_children() if child is projection)
    setattr(owner, name, nn.Identity())
    try:
        yield projection
    finally:
        setattr(owner, name, projection)


def lm_targets(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """The id each position predicts, flattened (-100: none): the label itself (masked LM), or the next
    position's label within the same sequence (causal LM; the last position predicts nothing)."""
    if causal:
        labels = F.pad(labels[..., 1:], (0, 1), value=-100)
    return labels.reshape(-1)


# The chunk workspace, kept from one call to the next (one per device): a fresh one this large would be mapped and
# faulted in afresh on every call by glibc's allocator under a fixed mmap threshold. Taken out while in use, so two
# calls at once (another thread) never share one.
_workspaces: dict[torch.device, torch.Tensor] = {}


def _take_workspace(numel: int, device: torch.device) -> torch.Tensor:
    """A flat float32 buffer of at least `numel` elements: the kept one when it is large enough. Hand it back with
    `_keep_workspace`."""
    buf = _workspaces.pop(device, None)
    return buf if buf is not None and buf.numel() >= numel else torch.empty(numel, device=device)


def _keep_workspace(buf: torch.Tensor) -> None:
    _workspaces[buf.device] = buf


class FusedDistillationLoss(torch.autograd.Function):
    """(weighted total, soft CE, LM CE, MSE) from hidden states through the projection, chunk by chunk; only
    the total carries a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
                weights: LossWeights, chunk: int, matmul: str, slot: Slot | None):
        n, vocab = hidden.shape[0], weight.shape[0]
        T = float(weights.temperature)
        dev = hidden.device
        h_all, w = hidden.float(), weight.float()
        b_vec = bias.float() if bias is not None else None
        # Per-row weights: each term's mean over its positions (no host sync: counts stay tensors).
        row_w = rows.reshape(-1).float()
        row_w = row_w / row_w.sum().clamp_min(1.0)
        has_target = targets != -100
        lm_w = has_target.float() / has_target.sum().clamp_min(1.0)
        safe_targets = targets.clamp_min(0)

        want_h = hidden.requires_grad
        want_w = weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        # Every chunk writes its rows of grad_h and adds to grad_w (the first one overwrites it: no zero fill of a
        # vocabulary-sized matrix) when some term has a weight; else they stay zero.
        new = torch.empty_like if weights.ce > 0 or weights.lm > 0 or weights.mse > 0 else torch.zeros_like
        grad_h = new(h_all) if want_h else None
        grad_w = new(w) if want_w else None
        grad_b = torch.zeros_like(b_vec) if want_b else None
        sums = torch.zeros(3, device=dev)  # ce, lm, mse
        want_grad = want_h or want_w or want_b
        if weights.needs_teacher:
            tw = teacher_weight.float()
            tb = teacher_bias.float() if teacher_bias is not None else None
            t_scale = 1.0 / T if weights.ce > 0 and weights.mse == 0 else 1.0
        rows_max = min(chunk, n)
        backend = cpu_matmul.resolve(matmul, h_all[:rows_max], w, b_vec)
        # One workspace of chunk x vocabulary buffers, reused by every chunk and kept for the next call; oneDNN
        # makes the two logits in tensors of its own.
        own = 2 if backend == "onednn" else 0
        kept = TENSORS_PER_ROW - own
        workspace = _take_workspace(kept * rows_max * vocab, dev)
        buffers = workspace[:kept * rows_max * vocab].view(kept, rows_max, vocab)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = h_all[start:end]
            views = [buf[:end - start] for buf in buffers]
            z, t = (None, None) if own else views[:2]
            a, b = views[-2:]
            z = cpu_matmul.linear(h, w, b_vec, backend, out=z)  # the chunk's student logits
            if weights.needs_teacher:  # at the temperature already unless the MSE needs them plain
                t = cpu_matmul.linear(teacher_hidden[start:end].float(), tw, tb, backend, t_scale, out=t)
            rw = row_w[start:end, None]
            grad = None
            if weights.mse > 0:
                diff = torch.sub(z, t, out=a)
                sums[2] += (diff * diff).sum(-1, keepdim=True).mul_(rw).sum()
                if want_grad:
                    grad = diff.mul_(rw * (2.0 * weights.mse)).clone()
            if weights.lm > 0:
                log_s = torch._log_softmax(z, -1, False, out=a)
                tg = safe_targets[start:end, None]
                lw = lm_w[start:end, None]
                sums[1] -= log_s.gather(-1, tg).mul_(lw).sum()
                if want_grad:  # (softmax(z) - one-hot) * weight
                    d = log_s.exp_().mul_(lw * weights.lm)
                    d.scatter_add_(-1, tg, lw * -weights.lm)
                    grad = d if grad is None else grad.add_(d)
            if weights.ce > 0:
                log_p = torch._log_softmax(t if t_scale != 1.0 else t.div_(T), -1, False, out=b)  # teacher, at T
                log_q = torch._log_softmax(z.div_(T), -1, False, out=t)  # student
                p = torch.exp(log_p, out=z)
                sums[0] += log_p.sub_(log_q).mul_(p).sum(-1, keepdim=True).mul_(rw).sum() * (T * T)
                if want_grad:  # d(T^2 KL)/dz = T (softmax(z / T) - p)
                    d = log_q.exp_().sub_(p)
                    grad = d.mul_(rw * (T * weights.ce)) if grad is None else grad.addcmul_(d, rw * (T * weights.ce))
            if grad is not None:
                if want_h:
                    cpu_matmul.matmul(grad, w, backend, out=grad_h[start:end])
                if want_w:
                    grad_w.addmm_(grad.t(), h, beta=float(start > 0))  # beta 0: the empty start is ignored
                if want_b:
                    grad_b.add_(grad.sum(0))
        _keep_workspace(workspace)
        total = weights.ce * sums[0] + weights.lm * sums[1] + weights.mse * sums[2]
        # Held on ctx, not saved, and dropped by the backward that hands them on: the graph keeps no reference to
        # them after it; the weight's goes to `slot` for a tied input embedding (common.tied_embedding).
        ctx.grads = [g.to(t.dtype) if g is not None else None
                     for g, t in ((grad_h, hidden), (grad_w, weight), (grad_b, bias))]
        ctx.slot = slot
        terms = sums.clone()
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    def backward(ctx, grad_total, grad_terms):
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError("the fused distillation loss serves one backward: its gradients were made in the "
                               "forward and handed on by the first (retain_graph cannot run it twice)")
        del ctx.grads
        scaled = [g.mul_(grad_total) if g is not None else None for g in grads]  # in place: made for this backward
        if ctx.slot is not None:  # a tied input embedding adds its rows into the weight's (common.tied_embedding)
            ctx.slot.grad = scaled[1]
        return (*scaled, None, None, None, None, None, None, None, None, None)


def fused_distillation_losses(hidden: torch.Tensor, projection: nn.Linear, teacher_hidden: torch.Tensor | None,
                              teacher_projection: nn.Linear | None, rows: torch.Tensor, targets: torch.Tensor,
                              weights: LossWeights, chunk_size: int | None = None, matmul: str = "auto",
                              slot: Slot | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the soft cross-entropy, LM cross-entropy and logit MSE (with a gradient to the
    student's hidden states and projection), and each term with a positive weight, unweighted ("ce", "lm",
    "mse"). `hidden`/`teacher_hidden`: (..., H) states entering each projection; `rows`: positions of the soft
    cross-entropy and the MSE; `targets`: the id each position predicts (`lm_targets`). The teacher side is
    read without a gradient (it may come from torch.inference_mode). `matmul`: the products' backend
    (common.cpu_matmul: auto, blas, onednn). `slot`: where the projection's weight gradient is left for a tied
    input embedding to add its own into (common.tied_embedding.tied_gradient)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if weights.needs_teacher:
        if teacher_hidden is None or teacher_projection is None:
            raise ValueError("the soft cross-entropy and the logit MSE need the teacher's hidden states and projection")
        t_hidden, t_weight, t_bias = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
                                      teacher_projection.weight.detach(),
                                      None if teacher_projection.bias is None else teacher_projection.bias.detach())
    else:
        t_hidden = t_weight = t_bias = None
    chunk = chunk_rows(projection.weight.shape[0], chunk_size)
    total, sums = FusedDistillationLoss.apply(h, projection.weight, projection.bias, t_hidden, t_weight, t_bias,
                                              rows.reshape(-1), targets.reshape(-1), weights, chunk, matmul, slot)
    names = (("ce", weights.ce), ("lm", weights.lm), ("mse", weights.mse))
    return total, {name: sums[i] for i, (name, alpha) in enumerate(names) if alpha > 0}


def token_nll(hidden: torch.Tensor, projection: nn.Linear, targets: torch.Tensor,
              chunk_size: int | None = None, matmul: str = "auto") -> torch.Tensor:
    """Each position's negative log-likelihood of its target (`lm_targets`; 0 where it has none), through the
    projection in chunks of positions: evaluation's perplexity without whole logits. No gradient."""
    h = hidden.reshape(-1, hidden.shape[-1]).detach().float()
    flat = targets.reshape(-1)
    weight = projection.weight.detach().float()
    bias = None if projection.bias is None else projection.bias.detach().float()
    chunk = chunk_rows(weight.shape[0], chunk_size)
    rows = min(chunk, h.shape[0])
    out = torch.zeros(h.shape[0], device=h.device)
    with torch.no_grad():
        backend = cpu_matmul.resolve(matmul, h[:rows], weight, bias)
        workspace = None if backend == "onednn" else _take_workspace(rows * weight.shape[0], h.device)
        for start in range(0, h.shape[0], chunk):
            end = min(start + chunk, h.shape[0])
            z = None if workspace is None else workspace[:(end - start) * weight.shape[0]].view(end - start, -1)
            z = cpu_matmul.linear(h[start:end], weight, bias, backend, out=z)
            log_s = torch._log_softmax(z, -1, False, out=z)
            tg = flat[start:end]
            out[start:end] = -log_s.gather(-1, tg.clamp_min(0)[:, None])[:, 0] * (tg != -100)
    if workspace is not None:
        _keep_workspace(workspace)
    return out.view(targets.shape)
