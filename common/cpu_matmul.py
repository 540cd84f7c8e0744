"""Float32 matrix products on the CPU through BLAS or through oneDNN: the vocabulary-sized products of the
chunked losses (common.fused_loss) and the linears of a model (common.routed_linear).

The stock CPU wheel runs torch.mm / torch.addmm through MKL, whose speed on these shapes depends on the CPU: on
2 cores of an AMD EPYC with AVX-512 (Zen 4), torch 2.13, a chunk's logits (128 x 384 -> 30,522) took 32-37 ms
through MKL and 15-17 ms through oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the kernel Inductor
calls for a linear on the CPU), the gradient to the hidden states (128 x 30,522 -> 384) 20 against 16 ms. The
projection's weight gradient (an accumulation into 30,522 x 384) stays with BLAS, whose accumulate-in-place
oneDNN's linear lacks. Both are float32 products that differ only in summation order.

The encoder's linears gain as much: 640 rows x 384 -> 1,536 (a feed-forward layer of all-MiniLM-L6-v2 on a
micro-batch of 5 sequences) took 4.0-4.2 ms through MKL and 1.7-1.9 ms through oneDNN on the same CPU, forward
and gradient to the input alike. common.routed_linear runs a model's nn.Linear modules through the backend
`resolve` picks for each weight's shape.

`resolve("auto", ...)` times both on the first rows it meets for a weight of a given shape (and thread count)
and keeps the faster for the process; "blas" or "onednn" fixes the choice (a CUDA device always takes BLAS:
cuBLAS). The module imports torch only when a function runs: parsers list BACKENDS without it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "blas", "onednn")
# The timed products of an "auto" choice: one of each as a warm-up, then this many of each, alternating.
TIMED_ROUNDS = 2

_chosen: dict[tuple, str] = {}


def onednn_available() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def backend_problem(name: str) -> str | None:
    """Why `name` cannot serve on this build (None: it can)."""
    if name not in BACKENDS:
        return f"unknown product backend {name!r} (one of {', '.join(BACKENDS)})"
    if name == "onednn" and not onednn_available():
        return "this PyTorch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise): use blas or auto"
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, scale: float = 1.0,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """(x @ weight.T + bias) * scale, made row-major by one product. (Made as (weight @ x.T + bias).T and copied,
    it cost the copy on top of a product no faster: 128 x 30,522 through MKL on 2 threads of a Xeon, 15.0-15.6 ms
    against 10.2-10.9.) BLAS writes into `out` when given, the scale riding on the product (no pass of its own);
    oneDNN returns a new tensor, the scale applied to x and the bias (small) before it."""
    import torch

    if backend == "onednn":
        if scale != 1.0:
            x = x * scale
            bias = None if bias is None else bias * scale
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if bias is not None:
        return torch.addmm(bias, x, weight.t(), beta=scale, alpha=scale, out=out)
    return torch.mm(x if scale == 1.0 else x * scale, weight.t(), out=out)


def matmul(x: torch.Tensor, weight: torch.Tensor, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight (weight: in x out, as the projection's (vocabulary x hidden) for the gradient to the hidden
    states): into `out` where given."""
    import torch

    if backend == "onednn":
        result = torch.ops.mkldnn._linear_pointwise(x, weight.t(), None, "none", [], "")
        return result if out is None else out.copy_(result)
    return torch.mm(x, weight, out=out)


def resolve(requested: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The backend of the products of `x` (one chunk of rows) with `weight`: `requested`, or for "auto" the
    faster on this CPU for this weight, timed once per process on the first chunk it meets (BLAS off the CPU or
    where oneDNN is missing)."""
    import torch

    problem = backend_problem(requested)
    if problem is not None:
        raise ValueError(problem)
    if requested != "auto":
        return requested
    if x.device.type != "cpu" or not onednn_available():
        return "blas"
    key = (tuple(weight.shape), torch.get_num_threads())  # not the rows: micro-batches vary, the winner does not
    if key not in _chosen:
        out = torch.empty(x.shape[0], weight.shape[0])
        seconds: dict[str, float] = {"blas": float("inf"), "onednn": float("inf")}
        order = ("blas", "onednn") + ("blas", "onednn", "onednn", "blas") * TIMED_ROUNDS
        with torch.no_grad():
            for i, name in enumerate(order):
                start = time.perf_counter()
                linear(x, weight, bias, name, out=out)
                if i >= 2:
                    seconds[name] = min(seconds[name], time.perf_counter() - start)
        _chosen[key] = min(seconds, key=seconds.get)
        logger.info("Products of %d rows x %d -> %d: %s (best of %d: BLAS %.1f ms, oneDNN %.1f ms)",
                    x.shape[0], x.shape[1], weight.shape[0], _chosen[key], 2 * TIMED_ROUNDS,
                    1e3 * seconds["blas"], 1e3 * seconds["onednn"])
    return _chosen[key]


def weight_gradient(grad: torch.Tensor, rows: torch.Tensor, backend: str) -> torch.Tensor:
    """grad.T @ rows (out x in). oneDNN takes both as row-major copies of their transposes: small next to the
    product for an encoder layer (640 x 384 -> 1,536: 2.5 ms against MKL's 4.0, copies included)."""
    import torch

    if backend == "onednn":
        return torch.ops.mkldnn._linear_pointwise(grad.t().contiguous(), rows.t().contiguous(), None, "none", [], "")
    return grad.t().mm(rows)
