"""Hill and SPLC: hand-computed cases, bad input, and the official fixture (HILL_SPLC.md)."""

from __future__ import annotations

import math

import pytest
import torch

from mlic.losses import LOSSES, LossInputError, build_loss
from mlic.losses.splc import splc_targets

TOL = 1e-8


@pytest.fixture(scope="module")
def fixture(official_fixture):
    return official_fixture("hill_splc_official.pt")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_registered_with_metadata():
    assert LOSSES["hill"].labels == LOSSES["splc"].labels == "partial"


def test_hill_hand_computed():
    logits = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([[1, -1]], dtype=torch.int8)
    q, p = sigmoid(2.0 - 1.0), sigmoid(1.0)
    expected = -(1 - q) ** 2 * math.log(q) + (1.5 - p) * p * p
    assert build_loss("hill")(logits, targets).item() == pytest.approx(expected, abs=1e-12)
    assert build_loss("hill", reduction="mean")(logits, targets).item() == pytest.approx(expected / 2, abs=1e-12)
    # an observed negative is treated as the official code treats every non-positive
    assert build_loss("hill")(logits, torch.tensor([[1, 0]])).item() == pytest.approx(expected, abs=1e-12)
    # finite where the official log(σ) underflows
    assert torch.isfinite(build_loss("hill")(torch.tensor([[-800.0, 0.0]], dtype=torch.float64), targets))


def test_splc_hand_computed_switches_on_at_change_epoch():
    logits = torch.tensor([[2.0, 1.0, -1.0]], dtype=torch.float64)  # σ(1) = 0.73 > τ: a pseudo-positive
    targets = torch.tensor([[1, -1, -1]], dtype=torch.int8)
    q = sigmoid(1.0)
    positive = -(1 - q) ** 2 * math.log(q)
    focal_negative = [-sigmoid(z) ** 2 * math.log(1 - sigmoid(z)) for z in (1.0, -1.0)]
    loss = build_loss("splc")
    loss.start_epoch(0)
    assert loss(logits, targets).item() == pytest.approx(positive + sum(focal_negative), abs=1e-12)
    loss.start_epoch(1)
    pseudo = -(1 - sigmoid(1.0)) ** 2 * math.log(sigmoid(1.0))  # no margin on a pseudo-positive
    assert loss(logits, targets).item() == pytest.approx(positive + pseudo + focal_negative[1], abs=1e-12)
    restored = build_loss("splc")
    restored.load_state_dict(loss.state_dict())
    assert restored(logits, targets).item() == loss(logits, targets).item()


def test_bad_input():
    with pytest.raises(LossInputError, match="reduction"):
        build_loss("hill", reduction="avg")
    with pytest.raises(LossInputError, match="tau"):
        build_loss("splc", tau=1.5)
    with pytest.raises(LossInputError, match="shape"):
        build_loss("hill")(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int8))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_official_cases(fixture, dtype):
    inputs = fixture["inputs"]
    logits_key = "logits" if dtype == "float64" else "logits_float32"
    worst = 0.0
    for case, meta in fixture["meta"]["cases"].items():
        expected = fixture["results"][dtype][case]
        name = "hill" if meta["official_class"] == "Hill" else "splc"
        matrices = {}
        for reduction in ("sum", "mean", "none"):
            loss = build_loss(name, **{**meta["kwargs"], "reduction": reduction})
            if name == "splc":
                loss.start_epoch(meta["epoch"])
            logits = inputs[logits_key].clone().requires_grad_(True)
            matrices[reduction] = loss(logits, inputs["targets_mlic"])
            if reduction == "sum":
                matrices[reduction].backward()
                grad = logits.grad
        if dtype == "float64":
            worst = max(worst, abs(matrices["sum"].item() - expected["loss"].item()),
                        abs(matrices["mean"].item() - expected["loss_mean"].item()),
                        (matrices["none"] - expected["loss_matrix"]).abs().max().item(),
                        (grad - expected["grad_logits"]).abs().max().item())
        else:
            torch.testing.assert_close(matrices["none"].detach(), expected["loss_matrix"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grad, expected["grad_logits"], rtol=1e-4, atol=1e-5)
    assert worst < TOL


def test_official_pseudo_labels(fixture):
    inputs = fixture["inputs"]
    positive = inputs["targets_mlic"] == 1
    for case in ("splc_epoch0", "splc_epoch1", "splc_epoch7"):
        expected = fixture["results"]["float64"][case]
        shifted, pseudo = splc_targets(inputs["logits"], positive, 0.6, 1.0)
        assert (shifted - expected["shifted_logits"]).abs().max() < TOL
        active = expected["correction_active"]
        assert torch.equal(pseudo if active else torch.zeros_like(pseudo), expected["pseudo_labels"].bool())
        assert int(pseudo.sum()) * active == expected["num_pseudo_labels"]
