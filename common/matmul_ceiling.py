"""The matrix-multiply ceiling of a piece of work: every matrix product it runs (torch's mm, addmm, bmm, baddbmm,
linear and scaled-dot-product attention, in place and `out=` forms included) recorded with its shapes, strides
and FLOPs while the work runs once, then each replayed alone on fresh tensors of the same layout and timed.
The sum of those times is what the work would take if it did nothing but its matrix products, each as fast as
this machine runs it at that shape: the speed no rewrite of the rest can beat.

    with MatmulRecorder() as recorder:
        step()
    ceiling = replay_seconds(recorder.calls)  # seconds, at torch's current thread count
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "linear", "scaled_dot_product_attention")


@dataclass(frozen=True)
class TensorLayout:
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        t = torch.empty_strided(self.size, self.stride, dtype=self.dtype)
        return t.normal_() if t.is_floating_point() else t.fill_(1)


def _op_name(func: Any) -> str:
    return func.overloadpacket.__name__.rstrip("_")


def matmul_flops(name: str, args: tuple) -> int:
    """Multiply-adds x 2 of one call (the products only: no bias, scaling or softmax)."""
    if name == "mm":
        (m, k), n = args[0].shape, args[1].shape[1]
        return 2 * m * k * n
    if name == "addmm":
        (m, k), n = args[1].shape, args[2].shape[1]
        return 2 * m * k * n
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name == "linear":
        x, w = args[0], args[1]
        return 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]
    if name == "scaled_dot_product_attention":
        q, k, v = args[:3]
        batch = q.numel() // (q.shape[-2] * q.shape[-1])
        return 2 * batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    raise ValueError(f"not a matrix product: {name}")


class MatmulRecorder(TorchDispatchMode):
    """Records every matrix product run inside it: `calls` counts each distinct (op, argument layouts and
    values) and `flops` sums their FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in MATMUL_OPS:
            self.flops += matmul_flops(name, args)
            self.calls[(func, _frozen(args), _frozen(kwargs))] += 1
        return out


def _frozen(x: Any) -> Any:
    """Arguments as a hashable key: tensors as their layouts, lists as tuples, dicts as sorted pairs."""
    if isinstance(x, torch.Tensor):
        return TensorLayout(tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in x.items()))
    return x


def replay_seconds(calls: Counter, repeats: int = 3,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds the recorded calls take when each runs alone: every distinct call on fresh tensors of its
    layouts, once to warm up, then the fastest of `repeats` timings, times how often it was made."""
    total = 0.0
    for (func, args, kwargs), count in calls.items():
        def fresh(x: Any) -> Any:
            return x.make() if isinstance(x, TensorLayout) else x
        real_args, real_kwargs = tree_map(fresh, args), {k: tree_map(fresh, v) for k, v in kwargs}
        with torch.no_grad():
            func(*real_args, **real_kwargs)
            best = float("inf")
            for _ in range(repeats):
                start = clock()
                func(*real_args, **real_kwargs)
                best = min(best, clock() - start)
        total += best * count
    return total
