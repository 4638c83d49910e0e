"""EM and EM + APL: hand-computed cases, bad input, and the official fixture (EM_APL.md)."""

from __future__ import annotations

import math

import pytest
import torch

from mlic.losses import LOSSES, LossInputError, build_loss
from mlic.losses.em_apl import apl_quotas, em_loss

TOL = 1e-8
EPS = 1e-5


@pytest.fixture(scope="module")
def fixture(official_fixture):
    return official_fixture("em_apl_official.pt")


def test_registered_with_metadata():
    assert LOSSES["em"].labels == LOSSES["em_apl"].labels == "single positive"


def test_em_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0), -1.0]], dtype=torch.float64)  # p = 0.5, 0.75, σ(-1)
    targets = torch.tensor([[1, -1, 0]], dtype=torch.int8)
    p0, p2 = 0.5, 1 / (1 + math.e)
    entropy_term = 0.2 * (0.75 * math.log(0.75 + EPS) + 0.25 * math.log(0.25 + EPS))
    expected = (-math.log(p0 + EPS) + entropy_term - math.log(1 - p2 + EPS)) / 3
    assert build_loss("em", alpha=0.2)(logits, targets).item() == pytest.approx(expected, abs=1e-12)
    soft = torch.tensor([[math.nan, 0.1, math.nan]], dtype=torch.float64)
    apl_term = -0.5 * (0.1 * math.log(0.75 + EPS) + 0.9 * math.log(0.25 + EPS))
    expected_apl = (-math.log(p0 + EPS) + apl_term - math.log(1 - p2 + EPS)) / 3
    assert em_loss(logits, targets, 0.2, soft, 0.5).item() == pytest.approx(expected_apl, abs=1e-12)


def _small_apl(**kwargs):
    observed = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [-1, -1, -1]], dtype=torch.int8)
    args = dict(num_images=4, num_classes=3, warmup_epochs=1, num_epochs=3, neg_proportion=1.0, observed=observed)
    return build_loss("em_apl", **{**args, **kwargs}).double()


def test_apl_pseudo_labels_hand_computed():
    loss = _small_apl()  # 3 unknowns per class, 2 updates -> quota int(3 / 2) = 1 per class and update
    assert loss.quota.tolist() == [1, 1, 1]
    assert loss.wants_predictions(0) and loss.wants_predictions(1) and not loss.wants_predictions(2)
    probs = torch.tensor([[0.9, 0.3, 0.2], [0.4, 0.9, 0.1], [0.2, 0.5, 0.9], [0.3, 0.6, 0.8]], dtype=torch.float64)
    assert loss.end_epoch(0, probs) == 3
    expected = torch.full((4, 3), math.nan, dtype=torch.float64)
    expected[2, 0], expected[0, 1], expected[1, 2] = 0.2, 0.3, 0.1
    torch.testing.assert_close(loss.pseudo_labels, expected, equal_nan=True)
    # never revised: the next update takes the next-lowest still-unlabelled entry of each class
    assert loss.end_epoch(1, probs * 0 + 0.5) == 3
    assert loss.pseudo_labels[2, 0] == 0.2 and (~torch.isnan(loss.pseudo_labels)).sum() == 6
    restored = _small_apl()
    restored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(restored.pseudo_labels, loss.pseudo_labels, equal_nan=True)


def test_apl_warmup_and_quota():
    loss = _small_apl(warmup_epochs=2)
    assert not loss.wants_predictions(0) and loss.end_epoch(0, torch.rand(4, 3)) == 0
    assert apl_quotas(torch.full((10, 2), -1), 0.9, 10, 5).tolist() == [1, 1]  # int(0.9 · 10 / 5) = 1


def test_bad_input():
    logits, targets = torch.zeros(2, 3), torch.tensor([[1, -1, -1], [-1, 1, -1]], dtype=torch.int8)
    loss = _small_apl()
    with pytest.raises(LossInputError, match="indices"):
        loss(logits, targets)
    with pytest.raises(LossInputError, match="no unknown"):
        build_loss("em")(logits, torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.int8))
    with pytest.raises(LossInputError, match="observed"):
        build_loss("em_apl", num_images=2, num_classes=3)
    with pytest.raises(LossInputError, match="no unknown"):
        _small_apl(observed=torch.ones(4, 3, dtype=torch.int8))
    with pytest.raises(LossInputError, match="warmup_epochs"):
        _small_apl(warmup_epochs=3)
    with pytest.raises(LossInputError, match="dataset order"):
        loss.end_epoch(1, torch.rand(2, 3))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_official_direct(fixture, dtype):
    inputs = fixture["inputs"]["direct"]
    torch_dtype = getattr(torch, dtype)
    worst = 0.0
    for case, expected in fixture["results"]["direct"].items():
        logits = inputs["logits"].to(torch_dtype).clone().requires_grad_(True)
        if expected["beta"] is None:
            value = build_loss("em", alpha=expected["alpha"])(logits, inputs["targets_mlic"])
        else:
            value = em_loss(logits, inputs["targets_mlic"], expected["alpha"], inputs["pseudo_targets_soft"],
                            expected["beta"])
        value.backward()
        reference = expected[dtype]
        if dtype == "float64":
            worst = max(worst, abs(value.item() - reference["loss"].item()),
                        (logits.grad - reference["grad_logits"]).abs().max().item())
        else:
            assert value.item() == pytest.approx(reference["loss"].item(), rel=1e-4)
            torch.testing.assert_close(logits.grad, reference["grad_logits"], rtol=1e-3, atol=1e-6)
    assert worst < TOL


def test_official_training_run(fixture):
    """Ten epochs: every step's loss and gradient, and the pseudo-label state after every epoch."""
    hparams, train = fixture["meta"]["hparams"], fixture["inputs"]["train"]
    num_images, num_classes = train["targets_mlic"].shape
    loss = build_loss("em_apl", num_images=num_images, num_classes=num_classes, alpha=hparams["alpha"],
                      beta=hparams["beta"], warmup_epochs=hparams["warmup_epoch"], num_epochs=hparams["num_epochs"],
                      neg_proportion=hparams["neg_proportion"], observed=train["targets_mlic"]).double()
    assert torch.equal((train["targets_mlic"] == -1).sum(dim=0), train["unlabel_num"])
    steps = fixture["results"]["steps"]
    worst = 0.0
    for epoch in range(hparams["num_epochs"]):
        loss.start_epoch(epoch)
        for step in (s for s in steps if s["epoch0"] == epoch):
            assert torch.equal(torch.isnan(loss.pseudo_labels[step["idx"]]), torch.isnan(step["pseudo_targets"]))
            logits = step["logits"].clone().requires_grad_(True)
            value = loss(logits, step["targets_mlic"], step["idx"])
            value.backward()
            worst = max(worst, abs(value.item() - step["loss"].item()),
                        (logits.grad - step["grad_logits"]).abs().max().item())
        made = loss.end_epoch(epoch, torch.sigmoid(train["pl_logits"][epoch]))
        expected = fixture["results"]["pseudo_targets_after_epoch"][epoch]
        assert made == int(fixture["results"]["new_pseudo_labels_per_epoch_and_class"][epoch].sum())
        assert torch.equal(torch.isnan(loss.pseudo_labels), torch.isnan(expected)), epoch
        worst = max(worst, (torch.nan_to_num(loss.pseudo_labels) - torch.nan_to_num(expected)).abs().max().item())
    assert worst < TOL
