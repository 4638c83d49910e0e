"""GR Loss: hand-computed cases, the offset schedule, bad input, and the official fixture (GR_LOSS.md)."""

from __future__ import annotations

import math

import pytest
import torch

from mlic.losses import LOSSES, LossInputError, build_loss
from mlic.losses.gr import gr_loss, gr_schedule, gr_weights

TOL = 1e-8
BETA, ALPHA = (0.0, 2.0, -2.0, -2.0), (0.5, 2.0, 0.8, 0.5)


@pytest.fixture(scope="module")
def fixture(official_fixture):
    return official_fixture("gr_official.pt")


def test_registered_with_metadata():
    assert LOSSES["gr"].labels == "single positive" and "IJCAI 2024" in LOSSES["gr"].paper


def test_official_default_schedule_table():
    # GR_LOSS.md's table (T = 8, n = 0): w never reaches wT = 2, mu/sigma reach their end values
    table = [gr_schedule(e, 8, 0, BETA, ALPHA) for e in range(8)]
    assert [w for w, _, _, _ in table] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    assert [mu for _, _, mu, _ in table] == pytest.approx([0.5375 + 0.0375 * e for e in range(8)])
    assert table[-1][3] == pytest.approx(0.5)
    aligned = [gr_schedule(e, 8, 0, BETA, ALPHA, "endpoints") for e in range(8)]
    assert aligned[0] == pytest.approx((0.0, -2.0, 0.5, 2.0)) and aligned[-1] == pytest.approx((2.0, -2.0, 0.8, 0.5))


def test_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0), 1.0]], dtype=torch.float64)  # p = 0.5, 0.75, σ(1)
    targets = torch.tensor([[1, -1, 0]], dtype=torch.int8)
    w, b, mu, sigma, q2, q3 = 1.0, -2.0, 0.6, 1.5, 0.01, 1.0
    k = 1 / (1 + math.exp(-(w * 0.75 + b)))
    v = math.exp(-0.5 * ((0.75 - mu) / sigma) ** 2)
    unknown = v * (k * (1 - 0.75**q2) / q2 + (1 - k) * (1 - 0.25**q3) / q3)
    p2 = 1 / (1 + math.exp(-1.0))
    expected = (-math.log(0.5 + 1e-7) + unknown - math.log(1 - p2 + 1e-7)) / 3
    assert gr_loss(logits, targets, w, b, mu, sigma, q2, q3).item() == pytest.approx(expected, abs=1e-12)
    kk, vv = gr_weights(torch.tensor([0.75], dtype=torch.float64), w, b, mu, sigma)
    assert kk.item() == pytest.approx(k) and vv.item() == pytest.approx(v)


def test_state_and_bad_input():
    loss = build_loss("gr", num_epochs=8)
    loss.start_epoch(3)
    restored = build_loss("gr", num_epochs=8)
    restored.load_state_dict(loss.state_dict())
    assert restored.schedule_values() == loss.schedule_values() == gr_schedule(3, 8, 0, BETA, ALPHA)
    with pytest.raises(LossInputError, match="num_epochs=8"):
        loss.start_epoch(8)
    with pytest.raises(LossInputError, match="beta"):
        build_loss("gr", beta=[0, 2, -2])
    with pytest.raises(LossInputError, match="linear_init"):
        build_loss("gr", num_epochs=4, linear_init=4)
    with pytest.raises(LossInputError, match="schedule"):
        build_loss("gr", schedule="fixed")
    with pytest.raises(LossInputError, match="no unknown"):
        loss(torch.zeros(1, 3), torch.tensor([[1, 0, 0]], dtype=torch.int8))


@pytest.mark.parametrize("name", ["coco", "pascal", "exercise"])
def test_official_run(fixture, name):
    """Every official step: schedule values, K, V, loss and gradient."""
    hparams = fixture["inputs"][name]["hparams"]
    loss = build_loss("gr", num_epochs=hparams["num_epochs"], linear_init=hparams["linear_init"],
                      beta=hparams["beta"], alpha=hparams["alpha"], q=hparams["q2q3"])
    worst = 0.0
    for row in fixture["results"][name]["schedule"]:
        assert row["epoch0"] == row["epoch"] - 1
        loss.start_epoch(row["epoch0"])
        values = loss.schedule_values()
        worst = max(worst, *(abs(a - b) for a, b in zip(values, (row["w"], row["b"], row["mu"], row["sigma"]))))
    for step in fixture["results"][name]["steps"]:
        loss.start_epoch(step["epoch0"])
        logits = step["logits"].clone().requires_grad_(True)
        value = loss(logits, step["targets_mlic"], step["idx"])
        value.backward()
        k, v = gr_weights(torch.sigmoid(step["logits"]), *loss.schedule_values())
        worst = max(worst, abs(value.item() - step["loss"].item()),
                    (logits.grad - step["grad_logits"]).abs().max().item(),
                    (k - step["K"]).abs().max().item(), (v - step["V"]).abs().max().item())
    assert worst < TOL
