"""VLPL's loss (EM + pseudo-labels): every official step and direct case (1e-8, float64), options, state, bad input."""

from __future__ import annotations

import pytest
import torch

from mlic.losses import LOSSES, LossInputError, build_loss

TOL = 1e-8


@pytest.fixture(scope="module")
def fixture(official_fixture):
    return official_fixture("vlpl_official.pt")


def rows(pl: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    full = torch.zeros(n, pl.shape[1], dtype=torch.int8)
    full[idx] = pl
    return full


def test_registered_with_metadata():
    cls = LOSSES["vlpl"]
    assert cls.labels == "single positive" and "CVPR Workshops 2024" in cls.paper and "CLIP" in cls.teacher


@pytest.mark.parametrize("run", ["warmup", "official_default"])
def test_official_runs(fixture, run, value_and_grad):
    data = fixture["runs"][run]
    hp = data["hparams"]
    n = data["targets_mlic"].shape[0]
    loss = build_loss("vlpl", alpha=hp["alpha"], beta_pos=hp["beta_pos"], warmup_epochs=hp["warmup_epoch"])
    epochs = set()
    for step in data["steps"]:
        loss.start_epoch(step["epoch0"])
        epochs.add(step["epoch0"])
        loss.set_pseudo_labels(rows(step["pseudo_labels"], step["idx"], n))
        assert loss.uses_pseudo_labels() == step["uses_pseudo_labels"]
        value, grad = value_and_grad(loss, step["logits"], step["targets_mlic"], step["idx"])
        assert abs(value.item() - step["loss"].item()) <= TOL
        assert (grad - step["grad_logits"]).abs().max() <= TOL
    assert epochs == set(range(hp["num_epochs"]))


def test_official_direct_cases(fixture, value_and_grad):
    d = fixture["direct"]
    for case in d["cases"]:
        loss = build_loss("vlpl", alpha=case["alpha"], beta_pos=case["beta_pos"], warmup_epochs=case["warmup_epoch"])
        loss.start_epoch(case["epoch0"])
        loss.set_pseudo_labels(rows(d["pseudo_labels"], d["idx"], d["num_rows"]))
        assert loss.uses_pseudo_labels() == case["uses_pseudo_labels"], case["name"]
        value, grad = value_and_grad(loss, d["logits"], d["targets_mlic"], d["idx"])
        assert abs(value.item() - case["loss"].item()) <= TOL, case["name"]
        assert (grad - case["grad_logits"]).abs().max() <= TOL, case["name"]


def test_pseudo_negative_option_and_observed_negative():
    logits = torch.tensor([[0.3, -0.2, 1.1, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1, -1, -1, 0]], dtype=torch.int8)
    pl = torch.tensor([[0, -1, 1, 0]], dtype=torch.int8)
    p = torch.sigmoid(logits)[0]
    eps = 1e-5
    lp, l1 = torch.log(p + eps), torch.log(1 - p + eps)
    base = -lp[0] + 0.7 * (-0.9 * lp[2] - 0.1 * l1[2]) - l1[3]
    official = build_loss("vlpl", alpha=0.1, beta_pos=0.7)
    official.set_pseudo_labels(pl)
    assert official(logits, targets, torch.tensor([0])).item() == pytest.approx((base / 4).item(), abs=1e-12)
    fixed = build_loss("vlpl", alpha=0.1, beta_pos=0.7, train_pseudo_negatives=True, beta_neg=0.5)
    fixed.set_pseudo_labels(pl)
    negative = 0.5 * (-0.1 * lp[1] - 0.9 * l1[1])
    assert fixed(logits, targets, torch.tensor([0])).item() == pytest.approx(((base + negative) / 4).item(), abs=1e-12)


def test_state_dict_resume():
    loss = build_loss("vlpl", alpha=0.1, beta_pos=0.7, warmup_epochs=1)
    pl = torch.randint(-1, 2, (5, 3), dtype=torch.int8)
    loss.set_pseudo_labels(pl)
    loss.start_epoch(2)
    restored = build_loss("vlpl", alpha=0.1, beta_pos=0.7, warmup_epochs=1)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.pseudo_labels, pl) and restored._epoch == 2 and restored.uses_pseudo_labels()
    sized = build_loss("vlpl", num_images=5, num_classes=3)
    assert sized.pseudo_labels.shape == (5, 3)


def test_bad_input():
    loss = build_loss("vlpl")
    logits, targets = torch.zeros(2, 3), torch.tensor([[1, -1, -1], [-1, 1, -1]], dtype=torch.int8)
    with pytest.raises(LossInputError, match="needs pseudo-labels from a teacher: add --teacher") as err:
        loss(logits, targets, torch.tensor([0, 1]))
    assert "\n" not in str(err.value)
    loss.set_pseudo_labels(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(LossInputError, match="indices"):
        loss(logits, targets)
    with pytest.raises(LossInputError, match="reach row 5"):
        loss(logits, targets, torch.tensor([0, 5]))
    with pytest.raises(LossInputError, match="int8"):
        loss.set_pseudo_labels(torch.full((2, 3), 2, dtype=torch.int8))
