"""Off-ramps and batched early exit against the plain model and against exiting one example at a time."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, RobertaConfig,
    RobertaForSequenceClassification,
)

from common.errors import UserError
from common.distillation import soft_cross_entropy
from common.models.highway import (
    HEAD, JOINT, OFF_RAMPS, EarlyExitModel, EntropyExit, PatienceExit, SelfDistillation, entropy,
)
from common.models.pooling import FIRST_TOKEN, MEAN

CONFIG = dict(vocab_size=60, hidden_size=32, num_hidden_layers=5, num_attention_heads=2, intermediate_size=48,
              max_position_embeddings=40)


def make_model(kind: str, num_labels: int = 3, pooling: str = FIRST_TOKEN) -> EarlyExitModel:
    torch.manual_seed(0)
    if kind == "bert":
        backbone = BertForSequenceClassification(BertConfig(num_labels=num_labels, **CONFIG))
    else:
        backbone = RobertaForSequenceClassification(RobertaConfig(num_labels=num_labels, pad_token_id=1, **CONFIG))
    model = EarlyExitModel(backbone, pooling=pooling)
    # Random off-ramps with larger weights so their confidence varies across rows and layers.
    with torch.no_grad():
        for ramp in model.off_ramps:
            ramp.classifier.weight.normal_(0, 2.0)
    return model.eval()


def batch(n: int = 9, seq: int = 14, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, seq), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(n):  # rows of different lengths, right-padded
        length = 4 + (i * 3) % (seq - 4)
        mask[i, length:] = 0
        ids[i, length:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_entropy_matches_hand_computed_values():
    # Uniform over 3 classes: log 3. One-hot-ish logits [100, 0]: ~0. Logits [0, log 3] -> p = (1/4, 3/4):
    # H = -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623351446...
    logits = torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4]])
    got = entropy(logits)
    assert got[0].item() == pytest.approx(math.log(3.0), abs=1e-6)
    assert got[1].item() == pytest.approx(0.0, abs=1e-6)
    assert got[2].item() == pytest.approx(0.5623351446, abs=1e-6)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_no_exit_equals_plain_model(kind):
    model, inputs = make_model(kind), batch()
    plain = model.backbone(**inputs).logits
    logits, exits = model.early_exit(EntropyExit(0.0), **inputs)  # entropy is never < 0
    assert torch.allclose(logits, plain, atol=1e-5)
    assert exits.tolist() == [5] * len(exits)
    every = model.all_exit_logits(**inputs)
    assert every.shape == (5, 9, 3)
    assert torch.allclose(every[-1], plain, atol=1e-5)


def make_rule(name: str, model: EarlyExitModel, inputs: dict) -> EntropyExit | PatienceExit:
    """Entropy thresholds between two rows' first-off-ramp entropies (at a quantile), so some rows leave at
    once and others go on; never equal to a row's entropy, where float noise would decide."""
    if name.startswith("patience"):
        return PatienceExit(int(name[-1]))
    first = np.sort(entropy(model.all_exit_logits(**inputs)[0]))
    k = int(float(name.split("q")[1]) * (len(first) - 1))
    return EntropyExit(float((first[k] + first[k + 1]) / 2))


@pytest.mark.parametrize("pooling", [FIRST_TOKEN, MEAN])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("rule_name", ["entropy-q0.3", "entropy-q0.6", "patience1", "patience2"])
def test_batched_exit_equals_one_at_a_time(kind, rule_name, pooling):
    """Padded rows in a batch that shrinks mid-forward against each row alone, unpadded (for mean pooling: the
    padding must not count in the mean, before or after the batch is cut)."""
    model, inputs = make_model(kind, pooling=pooling), batch()
    rule = make_rule(rule_name, model, inputs)
    logits, exits = model.early_exit(rule, **inputs)
    for i in range(len(exits)):
        one = {k: v[i: i + 1, : int(inputs["attention_mask"][i].sum())] for k, v in inputs.items()}
        single_logits, single_exit = model.early_exit(rule, **one)
        assert single_exit.item() == exits[i].item(), f"row {i}"
        assert torch.allclose(single_logits[0], logits[i], atol=1e-4), f"row {i}"
    if rule_name != "patience2":  # (random off-ramps rarely agree three times in a row)
        # The rows really exit at different layers, so the batch shrinks mid-forward (the case being tested).
        assert len(set(exits.tolist())) > 1, exits


def test_exit_logits_are_the_off_ramp_of_the_exit_layer():
    model, inputs = make_model("bert"), batch()
    rule = make_rule("entropy-q0.5", model, inputs)
    logits, exits = model.early_exit(rule, **inputs)
    every = model.all_exit_logits(**inputs)
    for i, layer in enumerate(exits.tolist()):
        assert torch.allclose(logits[i], every[layer - 1, i], atol=1e-4)
        ent = entropy(every[:, i])
        # It left at the first off-ramp below the threshold (or ran to the end).
        below = [j for j in range(4) if ent[j] < rule.threshold]
        assert layer == (below[0] + 1 if below else 5)


def test_mean_pooled_off_ramp_is_a_classifier_on_the_mean_of_the_real_tokens():
    model, inputs = make_model("bert", pooling=MEAN), batch()
    hidden = model.backbone(**inputs, output_hidden_states=True).hidden_states
    every = model.all_exit_logits(**inputs)
    ramp = model.off_ramps[1]
    assert ramp.pooler is None  # no dense layer: the mean goes straight to the classifier
    for i in range(len(inputs["input_ids"])):
        length = int(inputs["attention_mask"][i].sum())
        mean = hidden[2][i, :length].mean(dim=0)  # the output of layer 2, real tokens only
        expected = ramp.classifier.weight @ mean + ramp.classifier.bias
        assert torch.allclose(every[1, i], expected, atol=1e-5), f"row {i}"


def test_patience_counts_agreeing_off_ramps():
    model, inputs = make_model("bert"), batch()
    _, exits = model.early_exit(PatienceExit(1), **inputs)
    preds = model.all_exit_logits(**inputs).argmax(-1)  # [layers, rows]
    for i, layer in enumerate(exits.tolist()):
        agree = [j for j in range(1, 4) if preds[j, i] == preds[j - 1, i]]
        assert layer == (agree[0] + 1 if agree else 5)


def test_patience_on_regression_uses_threshold():
    model = make_model("bert", num_labels=1)
    inputs = batch()
    _, tight = model.early_exit(PatienceExit(1, regression=True, regression_threshold=1e-9), **inputs)
    _, loose = model.early_exit(PatienceExit(1, regression=True, regression_threshold=1e9), **inputs)
    assert tight.tolist() == [5] * 9  # nothing agrees within 1e-9
    assert loose.tolist() == [2] * 9  # everything agrees: leave at the second off-ramp


def test_stage_freezing_and_pooler_copy():
    model = make_model("bert")
    model.off_ramps_trained = False
    model.set_stage(HEAD)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.off_ramps.parameters())
    model.set_stage(OFF_RAMPS)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.off_ramps.parameters())
    pooler = model.backbone.bert.pooler.dense
    assert all(torch.equal(r.pooler.weight, pooler.weight) for r in model.off_ramps)


def test_stage_two_loss_is_sum_of_off_ramp_losses():
    model, inputs = make_model("bert"), batch()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    model.eval()  # no dropout, so the two computations see the same activations
    loss = model(labels=labels, objective=OFF_RAMPS, **inputs)["loss"]
    every = model.all_exit_logits(**inputs)
    expected = sum(torch.nn.functional.cross_entropy(every[j], labels) for j in range(4))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.off_ramps.parameters())


def test_save_and_reload_keeps_off_ramps_and_loads_in_stock_transformers(tmp_path):
    model, inputs = make_model("roberta"), batch()
    model.off_ramps_trained = True  # as after stage two
    model.save_pretrained(str(tmp_path))
    again = EarlyExitModel.from_pretrained(str(tmp_path)).eval()
    assert again.off_ramps_trained
    for rule in (EntropyExit(1.0), PatienceExit(1)):
        a, ea = model.early_exit(rule, **inputs)
        b, eb = again.early_exit(rule, **inputs)
        assert torch.equal(ea, eb) and torch.allclose(a, b, atol=1e-6)
    stock = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert torch.allclose(stock(**inputs).logits, model.backbone(**inputs).logits, atol=1e-6)


def test_pooling_is_saved_with_the_off_ramps_and_cannot_be_switched(tmp_path):
    model, inputs = make_model("bert", pooling=MEAN), batch()
    model.save_pretrained(str(tmp_path / "mean"))
    again = EarlyExitModel.from_pretrained(str(tmp_path / "mean")).eval()
    assert again.pooling == MEAN and torch.allclose(again.all_exit_logits(**inputs), model.all_exit_logits(**inputs),
                                                    atol=1e-6)
    assert EarlyExitModel.from_pretrained(str(tmp_path / "mean"), pooling=MEAN).pooling == MEAN
    with pytest.raises(UserError, match="pool with mean, not first_token"):
        EarlyExitModel.from_pretrained(str(tmp_path / "mean"), pooling=FIRST_TOKEN)
    # A folder from before the pooling choice (no "pooling" in off_ramps.json) has first-token off-ramps.
    make_model("bert").save_pretrained(str(tmp_path / "old"))
    meta_file = tmp_path / "old" / "off_ramps.json"
    meta = json.loads(meta_file.read_text())
    del meta["pooling"]
    meta_file.write_text(json.dumps(meta))
    assert EarlyExitModel.from_pretrained(str(tmp_path / "old")).pooling == FIRST_TOKEN
    # A folder without off-ramps takes the pooling asked for.
    model.backbone.save_pretrained(str(tmp_path / "plain"))
    assert EarlyExitModel.from_pretrained(str(tmp_path / "plain"), pooling=MEAN).off_ramps[0].pooling == MEAN


def test_off_ramps_of_another_shape_are_rejected(tmp_path):
    make_model("bert", num_labels=3).save_pretrained(str(tmp_path))
    config = BertConfig.from_pretrained(str(tmp_path), num_labels=2)
    with pytest.raises(UserError, match="off-ramps were trained for 3 labels"):
        EarlyExitModel.from_pretrained(str(tmp_path), config=config, ignore_mismatched_sizes=True)


def test_joint_loss_is_pabee_weighted_sum_and_trains_the_backbone():
    model, inputs = make_model("bert"), batch()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    model.set_stage(JOINT)
    assert all(p.requires_grad for p in model.parameters())
    model.eval()  # no dropout, so the two computations see the same activations
    loss = model(labels=labels, objective=JOINT, **inputs)["loss"]
    every = model.all_exit_logits(**inputs)
    per_exit = [torch.nn.functional.cross_entropy(every[j], labels).item() for j in range(5)]
    # PABEE: sum_i i * loss_i / sum_i i over the 5 exits (4 off-ramps, then the head).
    expected = (1 * per_exit[0] + 2 * per_exit[1] + 3 * per_exit[2] + 4 * per_exit[3] + 5 * per_exit[4]) / 15
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    embeddings = model.backbone.bert.embeddings.word_embeddings.weight
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.off_ramps.parameters())
    assert model.backbone.classifier.weight.grad.abs().sum() > 0


def test_joint_loss_on_regression_weights_squared_errors():
    model, inputs = make_model("bert", num_labels=1), batch()
    labels = torch.linspace(0, 5, 9)
    loss = model(labels=labels, objective=JOINT, **inputs)["loss"]
    every = model.all_exit_logits(**inputs)[..., 0]
    expected = sum((j + 1) * ((every[j] - labels) ** 2).mean().item() for j in range(5)) / 15
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_self_distillation_mixes_the_heads_softened_predictions():
    model, inputs = make_model("bert"), batch()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    distill = SelfDistillation(weight=0.25, temperature=2.0)
    loss = model(labels=labels, objective=OFF_RAMPS, distill=distill, **inputs)["loss"]
    every = model.all_exit_logits(**inputs)
    expected = 0.0
    for j in range(4):
        hard = torch.nn.functional.cross_entropy(every[j], labels).item()
        p_teacher = torch.softmax(every[-1] / 2.0, -1)
        kl = (p_teacher * (p_teacher.log() - torch.log_softmax(every[j] / 2.0, -1))).sum(-1).mean().item()
        expected += 0.75 * hard + 0.25 * 4.0 * kl  # the KL times T^2
        assert kl == pytest.approx(soft_cross_entropy(every[j], every[-1], 2.0).item() / 4.0, rel=1e-4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the head is the teacher: the soft term must not train it (frozen in stage two anyway)
    assert all(p.grad is not None for p in model.off_ramps.parameters())


def test_rules_that_cannot_fire_run_the_plain_forward_without_off_ramps():
    model, inputs = make_model("bert"), batch()
    plain = model.backbone(**inputs).logits
    ramp_calls = []
    ramp = model.off_ramps[0]
    ramp_forward = ramp.forward  # early exit calls forward itself (no module-call overhead): count there
    ramp.forward = lambda *args: ramp_calls.append(1) or ramp_forward(*args)
    for rule in (EntropyExit(0.0), PatienceExit(0), PatienceExit(4), None):  # 4 off-ramps: at most 3 agree
        logits, exits = model.early_exit(rule, **inputs)
        assert torch.equal(logits, plain) and exits.tolist() == [5] * 9
    assert ramp_calls == []
    # A rule that could fire but does not (no row under a tiny entropy) runs the off-ramps, same logits.
    logits, exits = model.early_exit(EntropyExit(1e-12), **inputs)
    assert torch.allclose(logits, plain, atol=1e-6) and exits.tolist() == [5] * 9
    assert ramp_calls == [1]
