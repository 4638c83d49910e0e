"""Partial-label losses (AN, AN-LS, WAN, EPR, ROLE) on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlic.losses import LOSSES, build_loss
from mlic.losses.partial import LabelEstimator, logit, role_loss

LOG2 = math.log(2.0)


def test_registered():
    for name in ("an", "an_ls", "wan", "epr", "role"):
        assert name in LOSSES
    assert isinstance(build_loss("an-ls"), LOSSES["an_ls"])


def test_an_hand_computed():
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1, -1]], dtype=torch.int8)
    assert build_loss("an", eps=None)(logits, targets).item() == pytest.approx(LOG2, abs=1e-7)
    # official eps: -log(0.5 + 1e-5) on both entries
    assert build_loss("an")(logits, targets).item() == pytest.approx(-math.log(0.5 + 1e-5), abs=1e-7)
    # an observed negative (0) is a negative, like an unknown
    assert build_loss("an", eps=None)(torch.tensor([[0.0, 2.0]]), torch.tensor([[1, 0]])).item() == pytest.approx(
        (LOG2 + math.log1p(math.exp(2.0))) / 2, abs=1e-6)


def test_an_ls_hand_computed():
    logits = torch.tensor([[math.log(3.0), math.log(3.0)]])  # p = 0.75
    targets = torch.tensor([[1, -1]])
    pos = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
    neg = -(0.9 * math.log(0.25) + 0.1 * math.log(0.75))
    value = build_loss("an_ls", smoothing=0.1, eps=None)(logits, targets).item()
    assert value == pytest.approx((pos + neg) / 2, abs=1e-6)


def test_wan_weights_unknowns_by_one_over_k_minus_one():
    logits = torch.zeros(1, 3)
    targets = torch.tensor([[1, -1, -1]])
    value = build_loss("wan", num_classes=3, eps=None)(logits, targets).item()
    assert value == pytest.approx((LOG2 + 2 * LOG2 / 2) / 3, abs=1e-7)
    with pytest.raises(ValueError, match="classes"):
        build_loss("wan", num_classes=4)(logits, targets)


def test_epr_hand_computed_and_gradient():
    logits = torch.zeros(2, 4, requires_grad=True)
    targets = torch.tensor([[1, -1, -1, -1], [-1, 1, -1, -1]])
    loss = build_loss("epr", num_classes=4, expected_positives=2.9, eps=None)(logits, targets)
    # loss matrix: log 2 on the two positives; regulariser (mean Σp − k)² / K² = (2 − 2.9)² / 16
    assert loss.item() == pytest.approx(2 * LOG2 / 8 + 0.81 / 16, abs=1e-6)
    loss.backward()
    reg_grad = 2 * (2 - 2.9) / 16 * 0.25 / 2  # d/dz of the regulariser, the same for every entry
    expected = torch.full((2, 4), reg_grad)
    expected[0, 0] += -0.5 / 8
    expected[1, 1] += -0.5 / 8
    torch.testing.assert_close(logits.grad, expected, atol=1e-7, rtol=0)


def test_role_hand_computed_and_stop_gradients():
    logits = torch.zeros(1, 2, requires_grad=True)
    est = torch.zeros(1, 2, requires_grad=True)
    targets = torch.tensor([[1, -1]])
    loss = role_loss(logits, est, targets, expected_positives=1.0, eps=None)
    # p = q = 0.5: positive entry ½(log2 + log2) + ½(log2 + log2) = 2 log2; unknown ½(2 log2) = log2
    # regulariser ½[(1 − 1)² + (1 − 1)²] / 4 = 0
    assert loss.item() == pytest.approx(3 * LOG2 / 2, abs=1e-6)
    loss.backward()
    # cross terms vanish at p = q (q̄ − p = 0); the observed positive gives ½·(−(1 − p)) / (B·K)
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.125, 0.0]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(est.grad, torch.tensor([[-0.125, 0.0]]), atol=1e-7, rtol=0)

    # stop-gradient: the classifier's gradient does not depend on the estimator through q's gradient path
    logits = torch.tensor([[0.3, -1.2]], requires_grad=True)
    est = torch.tensor([[2.0, 0.5]], requires_grad=True)
    role_loss(logits, est, targets, expected_positives=1.0, eps=None).backward()
    p, q = torch.sigmoid(logits.detach()), torch.sigmoid(est.detach())
    reg_p = 2 * (p.sum() - 1.0) / 4 * p * (1 - p)
    expected = 0.5 * (torch.tensor([[-(1 - p[0, 0]), 0.0]]) + (p - q)) / 2 + 0.5 * reg_p
    torch.testing.assert_close(logits.grad, expected, atol=1e-7, rtol=0)
    reg_q = 2 * (q.sum() - 1.0) / 4 * q * (1 - q)
    expected_q = 0.5 * (torch.tensor([[-(1 - q[0, 0]), 0.0]]) + (q - p)) / 2 + 0.5 * reg_q
    torch.testing.assert_close(est.grad, expected_q, atol=1e-7, rtol=0)


def test_role_module_uses_estimator_rows():
    observed = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 0, -1], [-1, -1, -1]], dtype=np.int8)
    loss = build_loss("role", num_images=5, num_classes=3, expected_positives=1.0, observed=observed, seed=3)
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([3, 1])
    value = loss(logits, torch.from_numpy(observed[[3, 1]]), rows)
    direct = role_loss(logits, loss.estimator.logits[rows], torch.from_numpy(observed[[3, 1]]), 1.0)
    assert value.item() == pytest.approx(direct.item(), abs=1e-7)
    with pytest.raises(ValueError, match="indices"):
        loss(logits, torch.from_numpy(observed[[3, 1]]))
    with pytest.raises(ValueError, match="indices"):
        loss(logits, torch.from_numpy(observed[[3, 1]]), torch.tensor([0, 5]))


def test_estimator_init_as_official():
    observed = np.full((50, 7), -1, dtype=np.int8)
    observed[np.arange(50), np.arange(50) % 7] = 1
    observed[0, 3] = 0
    est = LabelEstimator(50, 7)
    est.init_from_targets(observed, seed=11)
    values = est.logits.detach()
    pos, neg, unk = observed == 1, observed == 0, observed == -1
    assert torch.allclose(values[pos], torch.tensor(math.log(0.995 / 0.005)))
    assert torch.allclose(values[neg], torch.tensor(math.log(0.005 / 0.995)))
    bound = math.log(0.6 / 0.4)
    assert values[unk].abs().max() <= bound + 1e-6
    assert values[unk].std() > bound / 3  # spread over the interval, not a constant
    again = LabelEstimator(50, 7)
    again.init_from_targets(observed, seed=11)
    assert torch.equal(again.logits, est.logits)
    again.init_from_targets(observed, seed=12)
    assert not torch.equal(again.logits, est.logits)
    assert logit(0.995) == pytest.approx(5.293304824724492)


@pytest.mark.parametrize("name,kwargs", [
    ("an", {}), ("an_ls", {"smoothing": 0.1}), ("wan", {"num_classes": 6}),
    ("epr", {"num_classes": 6, "expected_positives": 2.0}),
    ("role", {"num_images": 4, "num_classes": 6, "expected_positives": 2.0}),
])
def test_half_precision_logits_and_reduction_none(name, kwargs):
    loss = build_loss(name, **kwargs)
    targets = torch.tensor([[1, -1, -1, 0, -1, -1]] * 4, dtype=torch.int8)
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    value = loss(logits, targets, torch.arange(4))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    matrix = build_loss(name, reduction="none", **kwargs)(logits.float(), targets, torch.arange(4))
    assert matrix.shape == (4, 6)
    if name in ("an", "an_ls", "wan"):  # no regulariser: the mean of the matrix is the objective
        assert matrix.mean().item() == pytest.approx(value.item(), abs=1e-2)
