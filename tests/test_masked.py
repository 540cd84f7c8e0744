"""common/models/masked.py: exact remaining fractions, straight-through gradients, the cubic schedule, global
top-k, regularization, surgery on BERT / RoBERTa / DistilBERT, and masked == reloaded == bertarized outputs
(safetensors, sharded, the original's .bin folders, and the compact CSR copy)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertForQuestionAnswering, pipeline

from common.errors import UserError
from common.models import masked

ENCODER_MATRICES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense")


def masked_qa(folder: str, method: str, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """The tiny QA model with its encoder masked and its scores random (a trained model's are not constant)."""
    torch.manual_seed(seed)
    model = AutoModelForQuestionAnswering.from_pretrained(folder)
    masked.mask_model(model, method)
    with torch.no_grad():
        for module in masked.masked_modules(model).values():
            if module.mask_scores is not None:
                module.mask_scores.normal_(0.0, scale)
    return model.eval()


def batch(folder: str) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return dict(tokenizer(["where does bob live ?", "what does alice own ?"],
                          ["bob lives in paris . alice owns a red car .", "alice owns a blue boat ."],
                          padding=True, return_tensors="pt"))


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return torch.stack([out.start_logits, out.end_logits])


# ----------------------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("method", ["topK", "magnitude"])
@pytest.mark.parametrize("fraction", [0.1, 0.37, 1.0])
def test_exact_remaining_fraction(method, fraction, squad_bert_dir):
    model = masked_qa(squad_bert_dir, method)
    masked.set_threshold(model, fraction)
    counts = masked.remaining_weights(model)
    assert len(counts) == 2 * len(ENCODER_MATRICES)
    for name, (kept, total) in counts.items():
        assert kept == int(fraction * total), name
        module = model.get_submodule(name)
        values = module.weight.abs() if method == "magnitude" else module.mask_scores
        mask = module.eval_mask().bool()
        if 0 < kept < total:  # the kept entries are the largest ones
            assert values[mask].min() > values[~mask].max()
    summary = masked.summarize_remaining(counts, masked.encoder_layers_prefix(model))
    assert summary["encoder"]["kept"] == sum(int(fraction * t) for _, t in counts.values())


def test_topk_breaks_ties_exactly():
    mask = masked.topk_mask(torch.zeros(7, 3), 5)  # constant scores, as a fresh model has
    assert int(mask.sum()) == 5
    values = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert masked.topk_mask(values, 3).tolist() == [1, 0, 1, 1, 0, 0]  # 3, then the first tied 2s


def test_threshold_masks_and_their_floor():
    scores = torch.linspace(-3, 3, 1000)
    assert int(masked.threshold_mask(scores, 1.0, sigmoid=False).sum()) == int((scores > 1.0).sum())
    assert int(masked.threshold_mask(scores, 0.5, sigmoid=True).sum()) == 500
    floor = masked.threshold_mask(torch.full((1000,), -5.0), 0.0, sigmoid=False)
    assert int(floor.sum()) == int(0.005 * 1000) + 1  # at least 0.5% of a matrix stays


@pytest.mark.parametrize("method, threshold", [("topK", 0.5), ("threshold", 0.0), ("sigmoied_threshold", 0.5)])
def test_gradients_reach_the_scores_straight_through(method, threshold):
    torch.manual_seed(0)
    layer = masked.MaskedLinear(4, 3, pruning_method=method)
    nn.init.normal_(layer.mask_scores)
    layer.threshold = threshold
    x, g = torch.randn(5, 4), torch.randn(5, 3)
    (layer(x) * g).sum().backward()
    grad_effective = g.T @ x  # dL/d(W * M)
    mask = layer.eval_mask()
    assert 0 < int(mask.sum()) < 12
    torch.testing.assert_close(layer.mask_scores.grad, grad_effective * layer.weight.detach())  # dL/dM, unchanged
    torch.testing.assert_close(layer.weight.grad, grad_effective * mask)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_l0_gates_gradient_and_noise():
    torch.manual_seed(0)
    layer = masked.MaskedLinear(4, 3, pruning_method="l0")
    with torch.no_grad():
        layer.mask_scores.copy_(torch.linspace(-1, 1, 12).view(3, 4))  # gates strictly inside (0, 1)
    layer.eval()
    x, g = torch.randn(5, 4), torch.randn(5, 3)
    (layer(x) * g).sum().backward()
    sig = torch.sigmoid(layer.mask_scores.detach())
    expected = (g.T @ x) * layer.weight.detach() * (masked.L0_RIGHT - masked.L0_LEFT) * sig * (1 - sig)
    torch.testing.assert_close(layer.mask_scores.grad, expected)
    layer.train()
    assert not torch.equal(layer.mask(), layer.mask())  # sampled gates in training
    assert ((layer.mask() >= 0) & (layer.mask() <= 1)).all()


def test_magnitude_has_no_scores_and_prunes_the_weight_gradient():
    torch.manual_seed(0)
    layer = masked.MaskedLinear(6, 5, pruning_method="magnitude")
    layer.threshold = 0.4
    assert layer.mask_scores is None
    x, g = torch.randn(3, 6), torch.randn(3, 5)
    (layer(x) * g).sum().backward()
    mask = layer.eval_mask()
    assert int(mask.sum()) == 12
    torch.testing.assert_close(layer.weight.grad, (g.T @ x) * mask)


# ----------------------------------------------------------------------------------------------------------
# schedule, global top-k, regularization


def test_cubic_schedule_values():
    schedule = masked.Schedule(1.0, 0.1, warmup_steps=10, initial_warmup=1, final_warmup=2, final_lambda=400.0)
    total = 100  # hold 1.0 up to step 10, cubic over steps 11..80 (70 steps), hold 0.1 after step 80
    assert schedule(1, total) == (1.0, 4000.0)
    assert schedule(10, total)[0] == 1.0
    assert schedule(11, total)[0] == pytest.approx(0.1 + 0.9 * (69 / 70) ** 3)
    assert schedule(45, total)[0] == pytest.approx(0.1 + 0.9 * 0.5**3)  # halfway: 0.2125
    assert schedule(80, total)[0] == pytest.approx(0.1)
    assert schedule(81, total) == (0.1, 400.0)
    threshold, lam = schedule(45, total)
    assert lam == pytest.approx(400.0 * threshold / 0.1)
    assert masked.Schedule(0.0, 0.1, 0, 1, 2)(50, 100) == (pytest.approx(0.1 * (1 - 0.5**3)), 0.0)
    steps = [schedule(s, total)[0] for s in range(1, total + 1)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # never increases


def test_schedule_shortfall_names_the_steps_and_flags():
    schedule = masked.Schedule(1.0, 0.15, warmup_steps=5400, initial_warmup=1, final_warmup=2)  # the README's
    never = schedule.shortfall(1000)
    assert "1000 optimizer steps" in never and "never moves" in never and "= 5400" in never
    for flag in ("--max_steps", "--num_train_epochs", "--warmup_steps", "--initial_warmup", "--final_warmup"):
        assert flag in never
    assert schedule(1000, 1000)[0] == 1.0  # what the warning is about: the end of such a run is not pruned
    jump = schedule.shortfall(16200)
    assert "jumps from 1 to 0.15 at step 5401" in jump and "= 16200" in jump
    assert schedule.shortfall(16201) is None
    assert masked.Schedule(0.5, 0.5, 5400, 1, 2).shortfall(10) is None  # nothing to schedule
    assert masked.Schedule(1.0, 0.1, 0, 1, 2).shortfall(1) is None


def test_global_topk_keeps_the_fraction_over_the_whole_encoder(squad_bert_dir):
    model = masked_qa(squad_bert_dir, "topK")
    first = next(iter(masked.masked_modules(model).values()))
    with torch.no_grad():
        first.mask_scores.mul_(3.0)  # one matrix with larger scores keeps more of its weights
    cut = masked.global_score_cut(model, 0.25)
    masked.set_threshold(model, 0.25, cut)
    counts = masked.remaining_weights(model)
    total = sum(t for _, t in counts.values())
    assert sum(k for k, _ in counts.values()) == int(0.25 * total)
    fractions = {n: k / t for n, (k, t) in counts.items()}
    assert fractions[next(iter(counts))] > 0.4 and min(fractions.values()) < 0.25
    assert masked.global_score_cut(model, 1.0) == -math.inf


def test_regularization_terms_by_hand(squad_bert_dir):
    model = masked_qa(squad_bert_dir, "sigmoied_threshold", scale=0.0)  # all scores 0
    assert masked.regularization_term(model, "l1").item() == pytest.approx(0.5)
    expected_l0 = 1 / (1 + math.exp(-(2 / 3) * math.log(1.1 / 0.1)))  # P(gate > 0) at score 0
    assert masked.regularization_term(model, "l0").item() == pytest.approx(expected_l0)
    with pytest.raises(UserError, match="magnitude"):
        masked.regularization_term(masked_qa(squad_bert_dir, "magnitude"), "l1")


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(pruning_method="movement"), "unknown --pruning_method 'movement'"),
    (dict(final_threshold=1.5), r"--final_threshold 1\.5 is out of range for topK"),
    (dict(pruning_method="sigmoied_threshold", initial_threshold=1.0), "out of range for sigmoied_threshold"),
    (dict(pruning_method="magnitude", regularization="l1", final_lambda=1.0), "magnitude pruning does not have"),
    (dict(pruning_method="sigmoied_threshold", initial_threshold=0.0, global_topk=True), "--global_topk works"),
    (dict(pruning_method="threshold", final_threshold=3.0, global_topk=True), "with --global_topk"),
    (dict(final_lambda=5.0), "no effect without --regularization"),
    (dict(mask_init="zeros"), "unknown --mask_init"),
])
def test_pruning_flag_problems(kwargs, pattern):
    flags = dict(pruning_method="topK", initial_threshold=1.0, final_threshold=0.1, regularization=None,
                 final_lambda=0.0, global_topk=False, mask_init="constant")
    problems = masked.check_pruning_flags(**{**flags, **kwargs})
    assert any(re.search(pattern, p) for p in problems), problems
    assert masked.check_pruning_flags(**flags) == []


# ----------------------------------------------------------------------------------------------------------
# surgery


def test_surgery_masks_exactly_the_encoder_linears(squad_bert_dir):
    stock = AutoModelForQuestionAnswering.from_pretrained(squad_bert_dir).eval()
    inputs = batch(squad_bert_dir)
    reference = outputs(stock, inputs)
    names = masked.mask_model(stock, "topK")
    assert names == [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ENCODER_MATRICES]
    assert type(stock) is BertForQuestionAnswering and type(stock.qa_outputs) is nn.Linear
    assert all(type(m) is not masked.MaskedLinear for n, m in stock.named_modules() if "encoder" not in n)
    assert torch.equal(outputs(stock, inputs), reference)  # a fresh mask keeps every weight
    masked.set_threshold(stock, 0.2)
    assert not torch.equal(outputs(stock, inputs), reference)  # the threshold lives in the modules


def test_stock_forward_and_a_pipeline_still_work(squad_bert_dir):
    model = masked_qa(squad_bert_dir, "topK")
    masked.set_threshold(model, 0.3)
    tokenizer = AutoTokenizer.from_pretrained(squad_bert_dir)
    extract = pipeline("feature-extraction", model=model.bert, tokenizer=tokenizer)
    features = torch.tensor(extract("bob lives in paris .")[0])
    with torch.no_grad():
        direct = model.bert(**tokenizer("bob lives in paris .", return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(features, direct)


def test_surgery_on_other_encoders(tiny_roberta_dir):
    from transformers import DistilBertConfig, DistilBertForQuestionAnswering

    roberta = AutoModelForQuestionAnswering.from_pretrained(tiny_roberta_dir)
    names = masked.mask_model(roberta, "magnitude")
    assert masked.encoder_layers_prefix(roberta) == "roberta.encoder.layer" and len(names) == 3 * 6
    torch.manual_seed(0)
    distil = DistilBertForQuestionAnswering(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2,
                                                             hidden_dim=64, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 50, (2, 9))
    reference = distil(input_ids=ids).start_logits
    names = masked.mask_model(distil, "topK")
    assert masked.encoder_layers_prefix(distil) == "distilbert.transformer.layer"
    expected = ["attention.k_lin", "attention.out_lin", "attention.q_lin", "attention.v_lin", "ffn.lin1", "ffn.lin2"]
    assert sorted({n.split(".", 4)[-1] for n in names}) == expected
    assert torch.equal(distil(input_ids=ids).start_logits, reference)


# ----------------------------------------------------------------------------------------------------------
# saving, loading, folding


@pytest.mark.parametrize("method, threshold, global_topk", [
    ("topK", 0.3, False), ("sigmoied_threshold", 0.6, False), ("threshold", 0.2, False),
    ("magnitude", 0.25, False), ("l0", 1.0, False), ("topK", 0.3, True),
])
def test_masked_reloaded_and_bertarized_outputs_are_equal(method, threshold, global_topk, squad_bert_dir, tmp_path):
    model = masked_qa(squad_bert_dir, method, scale=2.0)
    masked.set_threshold(model, threshold, masked.global_score_cut(model, threshold) if global_topk else None)
    inputs = batch(squad_bert_dir)
    reference = outputs(model, inputs)
    remaining = masked.remaining_weights(model)
    assert sum(k for k, _ in remaining.values()) < sum(t for _, t in remaining.values())

    masked.prepare_config_for_save(model)
    model.save_pretrained(tmp_path / "masked")
    assert masked.is_masked_folder(str(tmp_path / "masked"))
    reloaded = masked.load_masked_model(str(tmp_path / "masked"))
    assert torch.equal(outputs(reloaded, inputs), reference)
    assert masked.remaining_weights(reloaded) == remaining

    masked.fold_masks(reloaded)
    assert not masked.masked_modules(reloaded) and not hasattr(reloaded.config, "pruning")
    assert torch.equal(outputs(reloaded, inputs), reference)
    reloaded.save_pretrained(tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert "pruning" not in config
    stock = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "stock").eval()
    assert type(stock) is BertForQuestionAnswering and not masked.masked_modules(stock)
    assert torch.equal(outputs(stock, inputs), reference)
    zeros = sum(int((stock.get_submodule(n).weight == 0).sum()) for n in remaining)
    if method != "l0":
        assert zeros == sum(t - k for k, t in remaining.values())


@pytest.mark.parametrize("method, threshold, global_topk", [
    ("topK", 0.3, False), ("magnitude", 0.25, False), ("l0", 1.0, False), ("topK", 0.3, True),
])
def test_saved_masked_folder_loads_as_the_pruned_model_in_stock_transformers(method, threshold, global_topk,
                                                                             squad_bert_dir, tmp_path):
    """save_masked_model: stock from_pretrained gives the masked model's outputs (not the unpruned weights'), and
    this project's loader still gets the whole masked model back (another threshold needs the unpruned weights)."""
    model = masked_qa(squad_bert_dir, method, scale=2.0)
    masked.set_threshold(model, threshold, masked.global_score_cut(model, threshold) if global_topk else None)
    inputs = batch(squad_bert_dir)
    reference = outputs(model, inputs)
    folder = tmp_path / "masked"
    masked.save_masked_model(model, str(folder), max_shard_size="50KB")

    stock = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    assert type(stock) is BertForQuestionAnswering and not masked.masked_modules(stock)
    assert torch.allclose(outputs(stock, inputs), reference, rtol=0, atol=1e-5)
    remaining = masked.remaining_weights(model)
    if method != "l0":  # the pruned weights are zeros in the stock model
        zeros = sum(int((stock.get_submodule(n).weight == 0).sum()) for n in remaining)
        assert zeros == sum(t - k for k, t in remaining.values()) > 0

    reloaded = masked.load_masked_model(str(folder))
    assert torch.equal(outputs(reloaded, inputs), reference)
    assert masked.remaining_weights(reloaded) == remaining
    for name, module in masked.masked_modules(model).items():
        assert torch.equal(reloaded.get_submodule(name).weight, module.weight)  # unpruned, as trained
    if method != "l0":  # keeping more than was kept needs the unpruned weights
        for m in (model, reloaded):
            masked.set_threshold(m, 0.9, masked.global_score_cut(m, 0.9) if global_topk else None)
        assert torch.equal(outputs(reloaded, inputs), outputs(model, inputs))


def test_sharded_safetensors_and_original_bin_folders(squad_bert_dir, tmp_path):
    model = masked_qa(squad_bert_dir, "topK")
    masked.set_threshold(model, 0.3)
    inputs = batch(squad_bert_dir)
    reference = outputs(model, inputs)
    masked.prepare_config_for_save(model)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(masked.weight_files(str(tmp_path / "sharded"))) > 1
    assert torch.equal(outputs(masked.load_masked_model(str(tmp_path / "sharded")), inputs), reference)

    # The original code saved MaskedBertForQuestionAnswering: model_type masked_bert, pytorch_model.bin, no
    # threshold on record.
    old = tmp_path / "original"
    old.mkdir()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("pruning", "model_type", "architectures")}
    config.update(model_type="masked_bert", pruning_method="topK", mask_init="constant", mask_scale=0.0)
    (old / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), old / "pytorch_model.bin")
    with pytest.raises(UserError, match="give --threshold"):
        masked.load_masked_model(str(old))
    assert torch.equal(outputs(masked.load_masked_model(str(old), threshold=0.3), inputs), reference)


def test_compact_storage_is_lossless_and_smaller(squad_bert_dir, tmp_path):
    model = masked_qa(squad_bert_dir, "topK")
    masked.set_threshold(model, 0.1)
    sparse = [f"{n}.weight" for n in masked.masked_modules(model)]
    masked.fold_masks(model)
    state = model.state_dict()
    path = str(tmp_path / masked.COMPACT_FILE)
    stats = masked.save_compact(state, path, sparse)
    assert stats["stored_bytes"] < stats["dense_bytes"]
    restored = masked.load_compact_state_dict(path)
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)
    assert os.path.getsize(path) < sum(t.numel() * t.element_size() for t in state.values())


def test_loading_problems(squad_bert_dir, tmp_path):
    with pytest.raises(UserError, match="holds no masked model"):
        masked.load_masked_model(squad_bert_dir)
    with pytest.raises(UserError, match="holds no weights"):
        masked.read_state_dict(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read weights"):
        masked.read_state_dict(str(tmp_path))
