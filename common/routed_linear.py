"""A model's linear layers with their products through common.cpu_matmul's backend (BLAS or oneDNN, the faster
timed per weight shape on the first call): forward, gradient to the input and gradient to the weight.

`route_linears(model, "auto")` changes the class of each nn.Linear to RoutedLinear and of each GPT-2 Conv1D (a
linear whose weight is stored in x out) to RoutedConv1D, in place: parameters, state dict, hooks and DDP are
untouched; off the CPU, for another dtype, under autocast or where BLAS wins it is the layer's own forward."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from common.cpu_matmul import backend_problem, linear, matmul, onednn_available, resolve, weight_gradient

# Rows of the first input that an "auto" choice for a linear is timed on (at most).
ROWS_TIMED = 512


class LinearFunction(torch.autograd.Function):
    """y = x @ weight.T + bias, x with any leading dimensions, its three products through one backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
                ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(rows, weight)
        ctx.backend, ctx.has_bias, ctx.lead = backend, bias is not None, x.shape[:-1]
        return linear(rows, weight, bias, backend).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(grad, weight, ctx.backend).view(*ctx.lead, weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(grad, rows, ctx.backend)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


def routed(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """y = x @ weight.T + layer.bias through the layer's backend, or None where the layer's own forward serves
    (off the CPU, not float32, under autocast, or BLAS chosen). `weight`: out x in (a view for Conv1D)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return None
    backend = resolve(layer.matmul, x.reshape(-1, x.shape[-1])[:ROWS_TIMED], weight, layer.bias)
    return None if backend == "blas" else LinearFunction.apply(x, weight, layer.bias, backend)


class RoutedLinear(nn.Linear):
    """nn.Linear with its products through `matmul` (auto, blas, onednn), resolved per weight shape."""

    matmul = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = routed(self, x, self.weight)
        return super().forward(x) if y is None else y


class RoutedConv1D(Conv1D):
    """GPT-2's Conv1D (weight in x out) with its products through `matmul`; the weight's gradient comes back
    through the transposed view."""

    matmul = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = routed(self, x, self.weight.t())
        return super().forward(x) if y is None else y


ROUTED = {nn.Linear: RoutedLinear, RoutedLinear: RoutedLinear, Conv1D: RoutedConv1D, RoutedConv1D: RoutedConv1D}


def route_linears(model: nn.Module, requested: str) -> int:
    """Make every nn.Linear and Conv1D of `model` (exactly those classes: subclasses keep their own forward)
    routed, taking `requested`; returns how many. Nothing changes where the choice can only be BLAS."""
    problem = backend_problem(requested)
    if problem is not None:
        raise ValueError(problem)
    if requested == "blas" or not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        cls = ROUTED.get(type(module))
        if cls is not None:
            module.__class__ = cls
            module.matmul = requested
            count += 1
    return count
