"""The shared distillation losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from common.distillation import hidden_cosine, hidden_mse, soft_cross_entropy


def test_soft_cross_entropy_hand_computed():
    # Teacher logits [0, log 3] at T=1 -> p = (1/4, 3/4); student uniform -> q = (1/2, 1/2).
    # KL(p||q) = 1/4 log(1/2) + 3/4 log(3/2) = 0.1308121...
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    assert soft_cross_entropy(student, teacher, 1.0).item() == pytest.approx(0.1308121, abs=1e-6)
    # At T=2 the teacher logits halve: p = softmax([0, log 3 / 2]) = (1/(1+sqrt3), sqrt3/(1+sqrt3));
    # KL is scaled by T^2 = 4.
    p1 = 1 / (1 + math.sqrt(3))
    kl = p1 * math.log(2 * p1) + (1 - p1) * math.log(2 * (1 - p1))
    assert soft_cross_entropy(student, teacher, 2.0).item() == pytest.approx(4 * kl, abs=1e-6)
    assert soft_cross_entropy(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_cross_entropy_mask_and_errors():
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    mask = torch.tensor([[False, True]])
    assert soft_cross_entropy(student, teacher, 1.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_cross_entropy(student, teacher, 1.0).item() == pytest.approx(0.1308121 / 2, abs=1e-6)
    assert soft_cross_entropy(student, teacher, 1.0, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(student, teacher, 0.0)


def test_hidden_mse_and_cosine():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    # squared differences: (0, 1) and (0, 1) -> mean 0.5
    assert hidden_mse(s, t).item() == pytest.approx(0.5)
    assert hidden_mse(s, t, torch.tensor([[True, False]])).item() == pytest.approx(0.5)
    # cos((1,0),(1,1)) = 1/sqrt2; cos((0,2),(0,1)) = 1 -> mean of (1 - cos) = (1 - 1/sqrt2) / 2
    assert hidden_cosine(s, t).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert hidden_cosine(s, t, torch.tensor([[False, True]])).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_cosine(s, t, torch.tensor([[False, False]])).item() == 0.0
