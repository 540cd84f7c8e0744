"""Choosing an early-exit threshold for a metric budget: replayed decisions equal the batched early exit, the
choice on hand-made logits, the held-out calibration slice, the saved choice."""

from __future__ import annotations

import math

import pytest
import torch

from common.data.glue import split_calibration
from common.early_exit import choose_rule, load_choice, replay_exits, rule_from_choice, save_choice
from common.errors import UserError
from common.models.highway import EntropyExit, PatienceExit, entropy
from test_highway import batch, make_model


@pytest.mark.parametrize("rule", [EntropyExit(0.9), EntropyExit(1.05), PatienceExit(1), PatienceExit(2),
                                  EntropyExit(0.0), PatienceExit(0)])
def test_replayed_exits_equal_the_batched_early_exit(rule):
    model, inputs = make_model("bert"), batch()
    logits, exits = model.early_exit(rule, **inputs)
    replayed_logits, replayed_exits = replay_exits(rule, model.all_exit_logits(**inputs))
    assert replayed_exits.tolist() == exits.tolist()
    assert torch.allclose(replayed_logits, logits, atol=1e-5)


def accuracy(labels: torch.Tensor):
    return lambda logits: float((logits.argmax(-1) == labels).float().mean())


def two_class(p: float) -> list[float]:
    """Logits whose softmax is (1 - p, p)."""
    return [0.0, math.log(p / (1 - p))]


def test_choice_is_the_most_aggressive_rule_within_the_budget():
    # 3 exits (2 off-ramps + head), 4 rows, all labelled 1; the head is right on every row. Entropies:
    # h(.99) = 0.056 < h(.97) = 0.135 < h(.9) = 0.325 < h(.8) = 0.500 < h(.45) = 0.688.
    right99, wrong97, wrong45, right90 = two_class(0.99), two_class(0.03), two_class(0.45), two_class(0.9)
    every = torch.tensor([
        [right99, wrong97, wrong45, wrong45],   # off-ramp 1
        [wrong45, wrong45, right90, right90],   # off-ramp 2
        [two_class(0.8)] * 4,                   # the head
    ])
    labels = torch.ones(4, dtype=torch.long)
    h = {p: entropy(torch.tensor([two_class(p)]))[0].item() for p in (0.99, 0.97, 0.9, 0.45)}
    # Budget 0: only row 0 may leave early (above h(.97) row 1 leaves, wrong): 1 + 3 + 3 + 3 layers.
    strict = choose_rule("entropy", every, accuracy(labels), 0.0)
    assert strict["full_model_metric"] == 1.0 and strict["calibration_metric"] == 1.0
    assert h[0.99] < strict["threshold"] <= h[0.97]
    assert strict["avg_exit_layer"] == pytest.approx(2.5)
    # Budget 0.25: row 1 may leave wrong, rows 2 and 3 leave right at off-ramp 2 (above h(.9)); above h(.45)
    # they would leave wrong at off-ramp 1 (accuracy 0.25): 1 + 1 + 2 + 2 layers.
    loose = choose_rule("entropy", every, accuracy(labels), 0.25)
    assert loose["calibration_metric"] == 0.75
    assert h[0.9] < loose["threshold"] <= h[0.45]
    assert loose["avg_exit_layer"] == pytest.approx(1.5)
    assert loose["layers_saved_fraction"] == pytest.approx(0.5)


def test_patience_choice_and_never_exiting_when_nothing_fits():
    # Off-ramps agree with each other (class 0) on every row but the head says 1, the label: leaving early is
    # always wrong, so no budget below 1 allows any patience: the rule that never exits is chosen.
    every = torch.tensor([[[2.0, 0.0]] * 3, [[2.0, 0.0]] * 3, [[2.0, 0.0]] * 3, [[0.0, 2.0]] * 3])
    labels = torch.ones(3, dtype=torch.long)
    none = choose_rule("patience", every, accuracy(labels), 0.5)
    assert none["threshold"] == 0 and none["avg_exit_layer"] == 4 and none["calibration_metric"] == 1.0
    anything = choose_rule("patience", every, accuracy(labels), 1.0)
    assert anything["threshold"] == 1 and anything["avg_exit_layer"] == 2  # the second off-ramp agrees
    with pytest.raises(UserError, match="no entropy threshold for a regression task"):
        choose_rule("entropy", every[..., :1], lambda x: 0.0, 0.1, regression=True)


def test_calibration_slice_is_held_out_the_same_way_every_time():
    features = {"input_ids": torch.arange(20).unsqueeze(1), "labels": torch.arange(20)}
    rest, held = split_calibration(features, 5, seed=3)
    again_rest, again_held = split_calibration(features, 5, seed=3)
    assert torch.equal(held["labels"], again_held["labels"]) and torch.equal(rest["labels"], again_rest["labels"])
    assert len(held["labels"]) == 5 and len(rest["labels"]) == 15
    assert sorted(held["labels"].tolist() + rest["labels"].tolist()) == list(range(20))  # disjoint, complete
    assert held["labels"].tolist() == sorted(held["labels"].tolist())  # in file order
    assert torch.equal(held["input_ids"][:, 0], held["labels"])  # rows stay whole
    assert not torch.equal(split_calibration(features, 5, seed=4)[1]["labels"], held["labels"])
    with pytest.raises(UserError, match="cannot be held out of 20 training rows"):
        split_calibration(features, 20, seed=3)


def test_saved_choice_round_trip_and_damage(tmp_path):
    choice = choose_rule("patience", torch.tensor([[[2.0, 0.0]]] * 4), lambda x: 1.0, 0.0)
    save_choice(str(tmp_path), choice)
    loaded = load_choice(str(tmp_path))
    assert rule_from_choice(loaded, False, 0.1) == PatienceExit(1)
    assert load_choice(str(tmp_path / "missing")) is None
    (tmp_path / "early_exit.json").write_text("{not json")
    with pytest.raises(UserError, match="is damaged"):
        load_choice(str(tmp_path))
