"""Conformance with Cole et al.'s official losses and training steps (elijahcole/single-positive-multi-label).

The fixture holds their loss functions' outputs on fixed inputs (N=16, L=20, k=2.9, smoothing
0.1) in float64 and float32, and two Adam steps of a linear classifier + label estimator. Their
observed labels are +1 / 0 (unobserved) / -1; converted to mlic's 1 / -1 / 0 here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlic.config import TrainConfig
from mlic.engine.linear_probe import LinearProbe
from mlic.losses import build_loss

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "mlspl_official_losses.pt"

# our loss name and keyword arguments per fixture case
CASES = {
    "bce": ("bce", {"eps": 1e-5}),
    "bce_ls": ("bce_ls", {"smoothing": 0.1}),
    "an": ("an", {}),
    "an_ls": ("an_ls", {"smoothing": 0.1}),
    "wan": ("wan", {"num_classes": 20}),
    "epr": ("epr", {"num_classes": 20, "expected_positives": 2.9}),
    "role": ("role", {"num_images": 16, "num_classes": 20, "expected_positives": 2.9}),
    "role_random_est": ("role", {"num_images": 16, "num_classes": 20, "expected_positives": 2.9}),
}
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"official-loss fixture not found at {FIXTURE} (shared/fixtures is not checked out here)")
    return torch.load(FIXTURE, weights_only=False)


def theirs_to_ours(labels: torch.Tensor) -> torch.Tensor:
    """Their +1 / 0 / -1 (positive / unobserved / negative) -> our 1 / -1 / 0."""
    return torch.where(labels == 0, -1, torch.where(labels == -1, 0, 1)).to(torch.int8)


def test_fixture_meta(fixture):
    meta = fixture["meta"]
    assert meta["official_repo"] == "elijahcole/single-positive-multi-label"
    assert meta["LOG_EPSILON"] == 1e-5 and meta["expected_num_pos"] == 2.9 and meta["ls_coef"] == 0.1
    assert set(CASES) <= set(meta["cases"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_value_and_gradient(fixture, case, dtype):
    meta = fixture["meta"]["cases"][case]
    expected = fixture["results"][str(dtype).split(".")[1]][case]
    inputs = fixture["inputs"]
    name, kwargs = CASES[case]
    assert name == meta["official_loss_key"] or case.startswith("role")
    loss = build_loss(name, **kwargs).to(dtype)
    if meta["est_input"] is not None:
        with torch.no_grad():
            loss.estimator.logits.copy_(inputs[meta["est_input"]].to(dtype))
    logits = inputs["logits"].to(dtype).clone().requires_grad_(True)
    labels = inputs[meta["obs_input"]]
    # clean label matrices are 1 / 0 in both encodings; observed ones need converting
    targets = labels.to(torch.int8) if meta["train_set_variant"] == "clean" else theirs_to_ours(labels)
    value = loss(logits, targets, torch.arange(logits.shape[0]))
    value.backward()
    tol = TOLERANCE[dtype]
    assert value.dtype == dtype
    assert abs(value.item() - expected["total_loss"].item()) < tol
    torch.testing.assert_close(logits.grad, expected["grad_logits"], atol=tol, rtol=0)
    if "grad_est_logits" in expected:
        torch.testing.assert_close(loss.estimator.logits.grad, expected["grad_est_logits"], atol=tol, rtol=0)
    if expected["reg_loss"] is not None:  # the matrix part alone (reduction="none") is theirs too
        matrix = build_loss(name, reduction="none", **kwargs).to(dtype)
        if meta["est_input"] is not None:
            with torch.no_grad():
                matrix.estimator.logits.copy_(inputs[meta["est_input"]].to(dtype))
        torch.testing.assert_close(matrix(logits.detach(), targets, torch.arange(16)), expected["loss_mtx"],
                                   atol=tol, rtol=0)


@pytest.mark.parametrize("mode", ["official", "fast"])
@pytest.mark.parametrize("case", ["role", "an"])
def test_two_official_train_steps(fixture, case, mode):
    steps = fixture["train_steps"][case]
    params = steps["P"]
    assert params["lr"] == 1e-3 and params["lr_mult"] == 10.0
    targets = theirs_to_ours(steps["label_vec_obs"])
    loss_args = {"expected_positives": params["expected_num_pos"]} if case == "role" else {}
    config = TrainConfig.official_linear(loss=case, loss_args=loss_args, lr=params["lr"],
                                         estimator_lr_mult=params["lr_mult"], estimator_update=mode)
    num_images, dim = steps["feats"].shape
    probe = LinearProbe(dim, params["num_classes"], num_images, config, observed=targets)
    init = steps["init_state"]
    with torch.no_grad():
        probe.head.weight.copy_(init["f.weight"])
        probe.head.bias.copy_(init["f.bias"])
        if probe.estimator is not None:
            probe.estimator.copy_(init["g.logits"])
    for batch, loss_value, after in zip(steps["batches"], steps["step_losses"], steps["state_after_step"]):
        value = probe.step(steps["feats"][batch], targets[batch], batch)
        assert abs(value.item() - loss_value.item()) < 1e-6
        torch.testing.assert_close(probe.head.weight.detach(), after["f.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(probe.head.bias.detach(), after["f.bias"], atol=1e-6, rtol=0)
        if case == "role":
            # rows outside the batch keep moving on their Adam momentum (dense gradient of zeros)
            torch.testing.assert_close(probe.estimator_logits(), after["g.logits"], atol=1e-6, rtol=0)
        else:  # their estimator exists but gets no gradient under AN; ours does not exist
            assert torch.equal(after["g.logits"], init["g.logits"])
    moved = steps["state_after_step"][1]["g.logits"] != steps["state_after_step"][0]["g.logits"]
    if case == "role":
        first = steps["batches"][0]
        assert moved[first].all()  # the first batch's rows moved again in step 2 without being in it
