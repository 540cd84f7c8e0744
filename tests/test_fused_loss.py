"""The chunked distillation losses (common/fused_loss.py, through scripts/distill.py's loss step) against the
straightforward computation on whole logits: every loss term and every parameter gradient, for masked-LM and
causal-LM students, with and without --restrict_ce_to_mask, with padding, at chunk sizes that do and do not
divide the token count, with the vocabulary products through BLAS and through oneDNN (common/cpu_matmul.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config, GPT2LMHeadModel,
)

import distill
from common.distillation import hidden_cosine, hidden_mse, lm_cross_entropy, soft_cross_entropy
from common import cpu_matmul
from common.routed_linear import route_linears
from common.tied_embedding import TiedEmbedding
from common.fused_loss import (
    LossWeights, chunk_rows, fused_distillation_losses, lm_targets, output_projection, projection_removed,
    token_nll,
)

VOCAB = 53
pytestmark = pytest.mark.usefixtures("one_thread")
# The products' backends, each under test (oneDNN where this build has it).
PRODUCTS = ["blas", pytest.param("onednn", marks=pytest.mark.skipif(not cpu_matmul.onednn_available(),
                                                                    reason="no oneDNN linear in this build"))]


def reference_step(losses: distill.Losses, causal: bool, teacher: torch.nn.Module):
    """Today's loss step before the chunking: whole logits of both models, the terms of common.distillation."""
    def step(model, batch, state=None):
        ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        s = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        mask = (labels != -100) if losses.restrict_ce_to_mask else attention.bool()
        terms = {}
        if losses.alpha_ce > 0:
            terms["loss_ce"] = soft_cross_entropy(s.logits, t.logits, losses.temperature, mask)
        if losses.alpha_mlm > 0:
            terms["loss_mlm"] = lm_cross_entropy(s.logits, labels, causal=False)
        if losses.alpha_clm > 0:
            terms["loss_clm"] = lm_cross_entropy(s.logits, labels, causal=True)
        if losses.alpha_mse > 0:
            terms["loss_mse"] = hidden_mse(s.logits, t.logits, mask) * s.logits.shape[-1]
        if losses.alpha_cos > 0:
            terms["loss_cos"] = hidden_cosine(s.hidden_states[-1], t.hidden_states[-1], attention)
        weights = {"loss_ce": losses.alpha_ce, "loss_mlm": losses.alpha_mlm, "loss_clm": losses.alpha_clm,
                   "loss_mse": losses.alpha_mse, "loss_cos": losses.alpha_cos}
        return sum(weights[k] * v for k, v in terms.items()), terms
    return step


def run_of(losses: distill.Losses, causal: bool) -> distill.Run:
    return distill.Run(output_dir="", data_file="", token_counts=None, eval_file=None, teacher_path="",
                       teacher_type="", tokenizer_path="", student_type="", student_config=None, student_weights=None,
                       causal=causal, losses=losses, builtin=False, resume=None)


def tiny_pair(causal: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A teacher and a smaller student sharing the vocabulary and hidden size (the cosine loss needs it)."""
    torch.manual_seed(0)
    if causal:
        config = dict(vocab_size=VOCAB, n_embd=32, n_head=2, n_positions=32)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, **config)), GPT2LMHeadModel(GPT2Config(n_layer=1, **config))
    teacher = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=48, max_position_embeddings=32))
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=48,
                                                     max_position_embeddings=32))
    return teacher, student


def padded_batch(causal: bool) -> dict[str, torch.Tensor]:
    """Three sequences of 9, 6 and 4 tokens padded to 9 (19 real tokens of 27); MLM: a few masked positions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (3, 9), generator=g)
    attention = (torch.arange(9)[None, :] < torch.tensor([9, 6, 4])[:, None]).long()
    ids = ids.masked_fill(attention == 0, 0)
    if causal:
        labels = ids.masked_fill(attention == 0, -100)
    else:
        chosen = (torch.rand(3, 9, generator=g) < 0.3) & attention.bool()
        labels = ids.masked_fill(~chosen, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def soft_ce_scale(losses: distill.Losses, teacher: torch.nn.Module, student: torch.nn.Module,
                  batch: dict[str, torch.Tensor]) -> float:
    """The size of what the soft cross-entropy (a KL divergence) sums, in float64: T^2 times the mean over its
    positions of sum_v p_teacher * |log p_student|. The KL is that cross-entropy minus the teacher's entropy, so
    fp32 rounding errs in proportion to this, not to the KL, which can be a thousand times smaller."""
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    mask = (labels != -100) if losses.restrict_ce_to_mask else attention.bool()
    with torch.no_grad():  # float64 copies: the models under test stay as they are
        s = copy.deepcopy(student).double()(input_ids=ids, attention_mask=attention).logits[mask] / losses.temperature
        t = copy.deepcopy(teacher).double()(input_ids=ids, attention_mask=attention).logits[mask] / losses.temperature
    cross = (t.softmax(-1) * s.log_softmax(-1).abs()).sum(-1).mean()
    return float(cross) * losses.temperature ** 2


def grads(model: torch.nn.Module, total: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max())
        err = float((got[name] - want[name]).abs().max())
        assert err <= rel * max(scale, 1e-6), f"{name}: off by {err:.3g} of {scale:.3g}"


# Without the MSE the teacher's logits are made at the temperature directly (the settings).
@pytest.mark.parametrize("matmul", PRODUCTS)
@pytest.mark.parametrize("causal,restrict,mse", [(False, False, 0.3), (False, True, 0.3), (True, False, 0.3),
                                                 (False, False, 0.0)])
def test_every_term_and_gradient_equals_the_whole_logits_computation(causal, restrict, mse, matmul):
    teacher, student = tiny_pair(causal)
    teacher.eval().requires_grad_(False)
    student.eval()  # no dropout: both computations see the same network
    losses = distill.Losses(alpha_ce=5.0, alpha_mlm=0.0 if causal else 2.0, alpha_clm=0.5 if causal else 0.0,
                            alpha_mse=mse, alpha_cos=1.0, temperature=2.0, restrict_ce_to_mask=restrict)
    batch = padded_batch(causal)
    want_total, want_terms = reference_step(losses, causal, teacher)(student, batch)
    want_grads = grads(student, want_total)
    assert set(want_grads) == {n for n, p in student.named_parameters() if p.requires_grad}
    # The soft cross-entropy is a small difference of larger sums: it must agree within about one fp32 rounding
    # (1e-7) of their size, 1e-4 of the KL here. Relative to the KL itself, fp32 puts both computations up to
    # 1e-5 off the float64 value on some CPUs, so 1e-5 between them fails by rounding alone.
    ce_tolerance = 1e-7 * soft_ce_scale(losses, teacher, student, batch)
    # The models' linears through the same backend (distill.py routes them so), the student's tied input
    # embedding adding its gradient into the projection's (common.tied_embedding).
    route_linears(teacher, matmul)
    route_linears(student, matmul)
    for chunk in (1, 4, 7, 27, 64, None):  # 27 tokens: 4 and 7 leave a short last chunk
        total, terms = distill.DistillStep(run_of(losses, causal), teacher, chunk, matmul=matmul)(student, batch, None)
        assert terms.keys() == want_terms.keys()
        for name, value in want_terms.items():
            tolerance = dict(abs=ce_tolerance, rel=0) if name == "loss_ce" else dict(rel=1e-5)
            assert terms[name].item() == pytest.approx(value.item(), **tolerance), (chunk, name)
        assert total.item() == pytest.approx(want_total.item(), abs=losses.alpha_ce * ce_tolerance, rel=1e-5)
        assert_close_relative(grads(student, total), want_grads, 1e-5)
    assert isinstance(output_projection(student), torch.nn.Linear)  # the projection is back in place
    assert type(student.get_input_embeddings()) is TiedEmbedding and student.get_input_embeddings().slot is None


def test_a_term_without_positions_is_zero_with_a_zero_gradient():
    projection = torch.nn.Linear(4, 6)
    hidden = torch.randn(5, 4, requires_grad=True)
    nothing = torch.zeros(5, dtype=torch.bool)
    total, terms = fused_distillation_losses(hidden, projection, torch.randn(5, 4), torch.nn.Linear(4, 6), nothing,
                                             torch.full((5,), -100), LossWeights(ce=1.0, lm=1.0, mse=1.0), 2)
    assert {k: float(v) for k, v in terms.items()} == {"ce": 0.0, "lm": 0.0, "mse": 0.0}
    total.backward()
    assert float(hidden.grad.abs().max()) == 0.0 and float(projection.weight.grad.abs().max()) == 0.0


def test_helpers():
    # A causal LM's position t predicts the label at t + 1 of its own sequence; the last predicts nothing.
    labels = torch.tensor([[1, 2, 3], [4, 5, -100]])
    assert lm_targets(labels, causal=True).tolist() == [2, 3, -100, 5, -100, -100]
    assert lm_targets(labels, causal=False).tolist() == [1, 2, 3, 4, 5, -100]
    assert chunk_rows(30522, 100) == 100
    assert chunk_rows(30522) == 128  # 64 MiB / (4 tensors x 4 bytes x 30,522) = 137, in whole blocks of 64
    assert chunk_rows(500_000) == 8 and chunk_rows(10) >= 1  # fewer than a block fit: as many as fit
    _, student = tiny_pair(False)
    projection = output_projection(student)
    with projection_removed(student) as taken:
        assert taken is projection and isinstance(student.vocab_projector, torch.nn.Identity)
        out = student(input_ids=torch.tensor([[5, 6, 7]]))
        assert out.logits.shape == (1, 3, 32)  # the states entering the projection
    assert student.vocab_projector is projection


@pytest.mark.parametrize("matmul", PRODUCTS)
@pytest.mark.parametrize("causal", [False, True])
def test_token_nll_equals_the_log_softmax_of_whole_logits(causal, matmul):
    _, model = tiny_pair(causal)
    model.eval()
    batch = padded_batch(causal)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with projection_removed(model) as projection:
            features = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    want = -(picked * (labels != -100)).sum(-1)
    targets = lm_targets(batch["labels"], causal).view_as(batch["labels"])
    for chunk in (5, None):
        got = token_nll(features, projection, targets, chunk, matmul).sum(-1)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matmul", PRODUCTS)
def test_each_backend_computes_the_products(matmul):
    g = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, generator=g)
    want = (x @ weight.t() + bias) / 2
    got = cpu_matmul.linear(x, weight, bias, matmul, scale=0.5, out=torch.empty(9, 40))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cpu_matmul.linear(x, weight, None, matmul), x @ weight.t(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(9, 40, generator=g)
    out = torch.full((9, 16), float("nan"))
    assert cpu_matmul.matmul(grad, weight, matmul, out=out).data_ptr() == out.data_ptr()
    assert torch.allclose(out, grad @ weight, rtol=1e-5, atol=1e-5)


def test_auto_keeps_the_faster_backend_and_a_fixed_choice_is_checked(monkeypatch, caplog):
    x, weight = torch.randn(6, 8), torch.randn(30, 8)
    assert cpu_matmul.resolve("blas", x, weight, None) == "blas"
    with pytest.raises(ValueError, match="unknown product backend 'mkl'"):
        cpu_matmul.resolve("mkl", x, weight, None)
    if not cpu_matmul.onednn_available():
        assert cpu_matmul.resolve("auto", x, weight, None) == "blas"
        return
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    real = cpu_matmul.linear

    def slow_blas(x, weight, bias, backend, scale=1.0, out=None):  # BLAS made the slower of the two
        if backend == "blas":
            import time
            time.sleep(0.01)
        return real(x, weight, bias, backend, scale, out)

    monkeypatch.setattr(cpu_matmul, "linear", slow_blas)
    with caplog.at_level("INFO", logger="common.cpu_matmul"):
        assert cpu_matmul.resolve("auto", x, weight, None) == "onednn"
    assert "onednn (best of 4" in caplog.text
    monkeypatch.setattr(cpu_matmul, "linear", real)  # timed once per shape: the choice is kept
    assert cpu_matmul.resolve("auto", x, weight, None) == "onednn"
    assert cpu_matmul.resolve("auto", torch.randn(5, 8), weight, None) == "onednn"  # fewer rows: the same
    assert len(cpu_matmul._chosen) == 1
