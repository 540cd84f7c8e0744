"""Structured movement pruning (one score per head / neuron / block) and shrinking: the shrunk model computes what
the masked one does (BERT and RoBERTa, uneven widths, layers left with no head or no neuron), it reloads with
load_shrunk_model and a tampered layout is refused, and global top-k over heads and neurons keeps the requested
fraction of the encoder's weights."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering, RobertaConfig, RobertaForQuestionAnswering,
)

from common.errors import UserError
from common.io import save_folder_atomic
from common.models import masked, shrink

HEADS, HIDDEN, FFN = 4, 32, 16  # head size 8
FAMILIES = {"bert": (BertConfig, BertForQuestionAnswering), "roberta": (RobertaConfig, RobertaForQuestionAnswering)}


def tiny_qa(family: str, seed: int = 0) -> nn.Module:
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                          intermediate_size=FFN, max_position_embeddings=32, pad_token_id=1)
    return model_class(config).eval()


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs())
    return torch.stack([out.start_logits, out.end_logits])


def set_unit_scores(model: nn.Module, heads: list[list[float]], neurons: list[list[float]]) -> None:
    prefix = masked.encoder_layers_prefix(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, (h, n) in enumerate(zip(heads, neurons)):
            params[f"{prefix}.{i}.attention.self.query.mask_scores"].copy_(torch.tensor(h))
            params[f"{prefix}.{i}.intermediate.dense.mask_scores"].copy_(torch.tensor(n))


def uneven_masked(family: str) -> nn.Module:
    """Heads and neurons pruned by their scores, a different number in every layer (threshold 0)."""
    model = tiny_qa(family)
    masked.mask_model(model, "threshold", structure="heads_neurons")
    steps = torch.linspace(-1, 1, FFN)
    set_unit_scores(model, [[1, 1, -1, 1], [-1, 1, -1, -1], [1, -1, 1, -1]],
                    [steps.tolist(), (steps + 0.7).tolist(), (steps - 0.8).tolist()])
    masked.set_threshold(model, 0.0)
    return model.eval()


def test_one_score_per_head_and_neuron_shared_by_its_matrices():
    model = tiny_qa("bert")
    masked.mask_model(model, "topK", structure="heads_neurons")
    scores = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("mask_scores")}
    assert scores == {f"bert.encoder.layer.{i}.{m}.mask_scores": (n,) for i in range(3)
                      for m, n in (("attention.self.query", HEADS), ("intermediate.dense", FFN))}
    set_unit_scores(model, [[4, 3, 2, 1]] * 3, [list(range(FFN))] * 3)
    masked.set_threshold(model, 0.5)
    layer = model.bert.encoder.layer[0]
    head_rows = torch.tensor([1.0, 1, 0, 0]).repeat_interleave(HIDDEN // HEADS)  # heads 0 and 1 of 4 kept
    for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
        assert torch.equal(linear.eval_mask().expand_as(linear.weight), head_rows[:, None].expand(-1, HIDDEN))
    out = layer.attention.output.dense
    assert torch.equal(out.eval_mask().expand_as(out.weight), head_rows[None, :].expand(HIDDEN, -1))
    neuron_rows = (torch.arange(FFN) >= FFN // 2).float()
    assert torch.equal(layer.intermediate.dense.eval_mask().squeeze(1), neuron_rows)
    assert torch.equal(layer.output.dense.eval_mask().squeeze(0), neuron_rows)
    summary = masked.summarize_remaining(masked.remaining_weights(model), "bert.encoder.layer")
    assert summary["encoder"]["fraction"] == 0.5

    # Straight through: a head's score gets the sum, over its rows / columns of the four matrices, of the gradient
    # the loss has with respect to their (expanded) masks; computed here with the masks as plain leaf tensors.
    def loss() -> torch.Tensor:
        return model(**inputs(), start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss

    loss().backward()
    actual = layer.attention.self.query.mask_scores.grad.clone()
    parts = (("attention.self.query", 0), ("attention.self.key", 0), ("attention.self.value", 0),
             ("attention.output.dense", 1))
    leaves = {}
    for name, _ in parts:
        module = layer.get_submodule(name)
        leaves[name] = module.eval_mask().expand_as(module.weight).clone().requires_grad_(True)
        module.forward = (lambda x, module=module, leaf=leaves[name]:
                          nn.functional.linear(x, module.weight * leaf, module.bias))
    loss().backward()
    expected = sum((leaves[n].grad if axis == 0 else leaves[n].grad.t()).reshape(HEADS, -1).sum(1)
                   for n, axis in parts)
    assert actual.abs().sum() > 0 and torch.allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_shrunk_model_equals_the_masked_one_with_uneven_layers(family, tmp_path):
    model = uneven_masked(family)
    reference = logits(model)
    masked.fold_masks(model)
    layout = shrink.shrink_model(model)
    kept = [(layer["heads"], layer["neurons"]) for layer in layout["layers"]]
    assert kept == [([0, 1, 3], 8), ([1], 13), ([0, 2], 2)]
    assert not layout["stock_loadable"]
    assert model.get_submodule(f"{layout['layers_prefix']}.1.attention.self.query").weight.shape == (8, HIDDEN)
    assert torch.allclose(logits(model), reference, atol=1e-5)

    shrink.save_shrunk_model(model, layout, str(tmp_path))
    reloaded = shrink.load_shrunk_model(str(tmp_path))
    assert torch.allclose(logits(reloaded), reference, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in tiny_qa(family).parameters())
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # stock transformers refuses, loudly
        AutoModelForQuestionAnswering.from_pretrained(str(tmp_path))


def test_layers_left_without_heads_or_neurons_keep_their_residual_path(tmp_path):
    """Layer 0 loses every neuron (intermediate rows zero: each adds a constant act(b) * W_out[:, j], folded into
    the output bias), layer 1 every head (attention output columns zero), layer 2 every head by its value rows
    (each head then adds the constant W_O[:, h] @ b_V[h])."""
    model = tiny_qa("bert")
    layers = model.bert.encoder.layer
    with torch.no_grad():
        layers[0].intermediate.dense.weight.zero_()
        layers[1].attention.output.dense.weight.zero_()
        layers[2].attention.self.value.weight.zero_()
    reference = logits(model)
    layout = shrink.shrink_model(model)
    assert [(layer["heads"], layer["neurons"]) for layer in layout["layers"]] == [
        ([0, 1, 2, 3], 0), ([], FFN), ([], FFN)]
    assert isinstance(layers[1].attention.self, shrink.NoHeads)
    assert layers[0].intermediate.dense.weight.shape == (0, HIDDEN)
    assert torch.allclose(logits(model), reference, atol=1e-5)
    shrink.save_shrunk_model(model, layout, str(tmp_path))
    assert torch.allclose(logits(shrink.load_shrunk_model(str(tmp_path))), reference, atol=1e-5)


def test_tampered_layouts_are_refused(tmp_path):
    model = uneven_masked("bert")
    masked.fold_masks(model)
    layout = shrink.shrink_model(model)
    shrink.save_shrunk_model(model, layout, str(tmp_path))
    path = tmp_path / shrink.LAYOUT_FILE
    original = json.loads(path.read_text())

    def tampered(change, pattern):
        edited = json.loads(json.dumps(original))
        change(edited)
        path.write_text(json.dumps(edited))
        with pytest.raises(UserError, match=pattern):
            shrink.load_shrunk_model(str(tmp_path))

    tampered(lambda d: d["layers"][0].update(heads=[0, 1]), r"does not match the weights: .*layer\.0\.attention")
    tampered(lambda d: d["layers"][2].update(neurons=5), r"does not match the weights: .*layer\.2\.intermediate")
    tampered(lambda d: d["layers"].pop(), "lists 2 layers, the config has 3")
    tampered(lambda d: d["layers"][1].update(heads=[1, 1]), "not distinct increasing indices")
    tampered(lambda d: d.update(version=7), "not a version-1 shrink layout")
    tampered(lambda d: d["layers"].__setitem__(0, 3), "layer 0 is 3, not a record")
    tampered(lambda d: d.update(intermediate_size="64"), "intermediate_size '64' is not a whole number")
    path.write_text("{")
    with pytest.raises(UserError, match="cannot read"):
        shrink.load_shrunk_model(str(tmp_path))


def test_stock_from_pretrained_loads_a_model_with_all_heads_and_one_ffn_width(tmp_path):
    model = tiny_qa("bert")
    masked.mask_model(model, "topK", structure="heads_neurons")
    set_unit_scores(model, [[1, 1, 1, 1]] * 3, [list(range(FFN))] * 3)
    masked.set_threshold(model, 1.0)
    for module in masked.masked_modules(model).values():  # the neuron scores alone decide
        if module.score_owner is module and module.unit_size == 1:
            module.threshold = 0.25
    reference = logits(model)
    masked.fold_masks(model)
    layout = shrink.shrink_model(model)
    assert layout["stock_loadable"] and {layer["neurons"] for layer in layout["layers"]} == {FFN // 4}
    shrink.save_shrunk_model(model, layout, str(tmp_path))
    stock = AutoModelForQuestionAnswering.from_pretrained(str(tmp_path)).eval()
    assert stock.config.intermediate_size == FFN // 4
    assert torch.allclose(logits(stock), reference, atol=1e-5)
    # Counted against the dense widths, not the shrunk config's intermediate_size: every head, a quarter of
    # the neurons.
    counted = importlib.import_module("count_parameters").main(["--serialization_dir", str(tmp_path)])
    attention, ffn = 4 * HIDDEN * HIDDEN, 2 * HIDDEN * FFN
    assert counted["encoder"]["total"] == 3 * (attention + ffn)
    assert counted["encoder"]["kept"] == 3 * (attention + ffn // 4)


def test_a_plain_save_over_a_shrunk_folder_drops_its_layout(tmp_path):
    (tmp_path / shrink.LAYOUT_FILE).write_text("{}")
    save_folder_atomic(lambda folder: open(os.path.join(folder, "config.json"), "w").close(), str(tmp_path),
                       obsolete=(shrink.LAYOUT_FILE,))
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    save_folder_atomic(lambda folder: open(os.path.join(folder, shrink.LAYOUT_FILE), "w").close(), str(tmp_path),
                       obsolete=(shrink.LAYOUT_FILE,))  # a save that writes it replaces it
    assert sorted(os.listdir(tmp_path)) == ["config.json", shrink.LAYOUT_FILE]


def test_training_from_a_shrunk_folder_is_refused(tmp_path):
    model = uneven_masked("bert")
    masked.fold_masks(model)
    shrink.save_shrunk_model(model, shrink.shrink_model(model), str(tmp_path))
    with pytest.raises(UserError, match="shrunk model .* not trained further"):
        importlib.import_module("run_squad_pruning").load_student(str(tmp_path), None, None)


@pytest.mark.parametrize("structure", ["heads_neurons", "blocks"])
def test_global_topk_keeps_the_requested_fraction_of_weights(structure):
    model = tiny_qa("bert")
    masked.mask_model(model, "topK", "uniform", 1.0, structure=structure, block_size=8)
    prefix = masked.encoder_layers_prefix(model)
    largest_unit = 4 * (HIDDEN // HEADS) * HIDDEN if structure == "heads_neurons" else 8 * 8
    total = sum(m.weight.numel() for m in masked.masked_modules(model).values())
    for fraction in (0.7, 0.5, 0.3):
        masked.set_threshold(model, fraction, masked.global_score_cut(model, fraction))
        summary = masked.summarize_remaining(masked.remaining_weights(model), prefix)
        # To within half a unit; blocks: also the floor of threshold masks (a matrix keeps at least one block).
        assert abs(summary["encoder"]["kept"] - fraction * total) <= max(largest_unit / 2, 0.01 * total)
        if structure == "heads_neurons":
            layers = [summary["layers"][str(i)]["fraction"] for i in range(3)]
            assert max(layers) > min(layers)  # one cut for the encoder: the layers differ


def test_structured_flag_problems():
    assert masked.check_pruning_flags("magnitude", 1, 0.5, None, 0, False, "constant", structure="heads_neurons")
    assert masked.check_pruning_flags("topK", 1, 0.5, None, 0, False, "kaiming", structure="heads_neurons")
    assert masked.check_pruning_flags("topK", 1, 0.5, None, 0, False, "constant", structure="blocks", block_size=0)
    assert not masked.check_pruning_flags("l0", 1, 0.5, None, 0, False, "kaiming", structure="blocks")
