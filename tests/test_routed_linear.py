"""common/routed_linear.py and common/tied_embedding.py: a model's linears through oneDNN and a tied input
embedding's gradient added into the output projection's give what stock nn.Linear and nn.Embedding give."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cpu_matmul
from common.routed_linear import RoutedLinear, route_linears
from common.tied_embedding import Slot, TiedEmbedding, tied_gradient

pytestmark = pytest.mark.usefixtures("one_thread")
needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="no oneDNN linear in this build")


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8, bias=False), nn.Sequential(nn.Linear(8, 8)))


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@needs_onednn
@pytest.mark.parametrize("requested", ["onednn", "auto"])
def test_routed_linears_give_the_stock_outputs_and_gradients(requested):
    plain = stack()
    routed = copy.deepcopy(plain)
    assert route_linears(routed, requested) == 3
    assert all(type(m) is RoutedLinear for m in routed.modules() if isinstance(m, nn.Linear))
    assert routed.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 5, 16)  # leading dimensions of a batch of sequences
    want, got = run(plain, x), run(routed, x)
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    for name, grad in want[2].items():
        assert torch.allclose(got[2][name], grad, rtol=1e-5, atol=1e-6), name


@needs_onednn
def test_a_frozen_input_and_other_dtypes_take_the_stock_path():
    layer = copy.deepcopy(stack()[0])
    route_linears(layer, "onednn")
    x = torch.randn(4, 16)
    y = layer(x)  # no gradient wanted for x: only the weight's and the bias's
    y.sum().backward()
    assert torch.allclose(layer.weight.grad, torch.ones(24, 1) * x.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.bias.grad, torch.full((24,), 4.0))
    double = copy.deepcopy(layer).double()
    assert double(x.double()).dtype == torch.float64  # nn.Linear's own forward
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --bf16 on the CPU: autocast's bfloat16 product
        assert layer(x).dtype == torch.bfloat16


def test_blas_routes_nothing_and_a_bad_name_is_refused():
    model = stack()
    assert route_linears(model, "blas") == 0
    assert not any(type(m) is RoutedLinear for m in model.modules())
    with pytest.raises(ValueError, match="unknown product backend 'mkl'"):
        route_linears(model, "mkl")


class Tied(nn.Module):
    """An embedding whose matrix is also the output projection's (as DistilBERT's, GPT-2's)."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 4, padding_idx=padding_idx)
        self.out = nn.Linear(4, 11)
        self.out.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.out


class LeavesItsGradient(torch.autograd.Function):
    """sum(h @ weight.T * c), its weight gradient computed by hand and left in the slot, as the fused loss does."""

    @staticmethod
    def forward(ctx, h, weight, c, slot):
        ctx.save_for_backward(h, c)
        ctx.slot = slot
        return (h @ weight.t() * c).sum()

    @staticmethod
    def backward(ctx, grad):
        h, c = ctx.saved_tensors
        rows = h.reshape(-1, h.shape[-1])
        grad_w = (c.reshape(-1, c.shape[-1]).t() @ rows) * grad
        if ctx.slot is not None:
            ctx.slot.grad = grad_w
        return None, grad_w, None, None


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_the_tied_lookup_adds_its_gradient_into_the_loss_one(padding_idx):
    ids = torch.tensor([[0, 3, 3, 7], [5, 0, 0, 3]])  # repeated ids and padding positions
    c = torch.randn(2, 4, 11)

    def loss(model: Tied, slot: Slot | None) -> torch.Tensor:
        h = torch.tanh(model.embed(ids) * 1.5)
        return LeavesItsGradient.apply(h, model.out.weight, c, slot)

    plain, tied = Tied(padding_idx), Tied(padding_idx)
    plain.zero_grad()
    loss(plain, None).backward()
    with tied_gradient(tied) as slot:
        assert isinstance(slot, Slot) and type(tied.embed) is TiedEmbedding
        total = loss(tied, slot)
    total.backward()  # after the block, as the training loop does
    assert slot.grad is None  # handed on, not kept
    assert torch.allclose(tied.embed.weight.grad, plain.embed.weight.grad, rtol=1e-6, atol=1e-7)
    if padding_idx is not None:  # the padding row: the loss's gradient alone, nothing from the lookup
        with torch.no_grad():
            h = torch.tanh(tied.embed.weight[ids] * 1.5)
        from_loss = c.reshape(-1, 11).t() @ h.reshape(-1, 4)
        assert torch.allclose(tied.embed.weight.grad[0], from_loss[0], rtol=1e-6, atol=1e-7)


def test_an_empty_slot_or_an_untied_model_keeps_the_stock_gradient():
    ids = torch.tensor([[1, 2, 2]])
    plain, tied = Tied(None), Tied(None)
    F.embedding(ids, plain.embed.weight).pow(2).sum().backward()
    with tied_gradient(tied):  # no loss leaves a gradient in the slot
        y = tied.embed(ids)
    y.pow(2).sum().backward()
    assert torch.equal(tied.embed.weight.grad, plain.embed.weight.grad)
    untied = Tied(None)
    untied.out.weight = nn.Parameter(untied.out.weight.detach().clone())
    with tied_gradient(untied) as slot:
        assert slot is None and type(untied.embed) is nn.Embedding


@needs_onednn
def test_gpt2_conv1d_layers_are_routed_and_give_the_stock_outputs_and_gradients():
    from transformers import GPT2Config, GPT2LMHeadModel
    from common.routed_linear import RoutedConv1D

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_head=2, n_layer=2, n_positions=16)).eval()
    routed = copy.deepcopy(plain)
    assert route_linears(routed, "onednn") == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp c_proj per layer; lm_head
    assert sum(type(m) is RoutedConv1D for m in routed.modules()) == 8
    ids = torch.randint(0, 40, (2, 7))
    outputs = []
    for model in (plain, routed):
        logits = model(input_ids=ids).logits
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = outputs
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-5, atol=1e-6), name
