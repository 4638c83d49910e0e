"""Large Loss (LL-R, LL-Ct, LL-Cp): hand-computed cases, bad input, and the official fixture.

The fixture (shared/fixtures/large_loss_official.pt, LARGE_LOSS.md) holds the LL repository's and
the BoostLU repository's ``compute_batch_loss`` outputs on 8 batches and an LL-Cp run of 4 epochs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlic.losses import LOSSES, LossInputError, build_loss
from mlic.losses.large_loss import clean_rate, modified_count

TOL = 1e-8


@pytest.fixture(scope="module")
def fixture(official_fixture):
    return official_fixture("large_loss_official.pt")


def test_registered_with_metadata():
    for name in ("ll_r", "ll_ct", "ll_cp"):
        assert LOSSES[name].labels == "partial" and "Large Loss" in LOSSES[name].paper


def test_float_schedule_quirk():
    # repeated subtraction, as theirs: 16·20·(1 − rate) = 8.000000000000007 at epoch 6 -> k = 9
    assert modified_count(16, 20, 5, 0.5, "ll_r") == 9
    assert modified_count(10, 80, 1, 0.5, "ll_r") == 5  # COCO last batch of 10: 4.0000000000000036
    assert modified_count(5, 20, 4, 0.5, "ll_r") == 3
    assert modified_count(16, 20, 0, 0.5, "ll_r") == 0 and clean_rate(0, 0.5) == 1
    assert modified_count(16, 20, 7, 0.1, "ll_cp") == math.ceil(320 * 0.001)  # LL-Cp: constant rate


def test_hand_computed_reject_and_correct():
    # one image, four classes: positive, two unknowns (large / small loss), observed negative
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, -1, -1, 0]], dtype=torch.int8)
    base = F.binary_cross_entropy_with_logits(logits.detach(), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                                              reduction="none")[0]
    # delta_rel 25 %: epoch 1 -> rate 0.75 -> k = ceil(4 · 0.25) = 1: the unknown with logit 3 is modified
    ll_r = build_loss("ll_r", delta_rel=25)
    ll_r.start_epoch(1)
    value = ll_r(logits, targets)
    assert value.item() == pytest.approx((base[0] + base[2] + base[3]).item() / 4, abs=1e-12)
    value.backward()
    assert logits.grad[0, 1].item() == 0.0
    ll_ct = build_loss("ll_ct", delta_rel=25)
    ll_ct.start_epoch(1)
    corrected = F.softplus(torch.tensor(-3.0, dtype=torch.float64)).item()  # -log σ(3)
    assert ll_ct(logits, targets).item() == pytest.approx((base[0] + corrected + base[2] + base[3]).item() / 4,
                                                          abs=1e-12)
    ll_ct.start_epoch(0)  # the first epoch is plain assume-negative
    assert ll_ct(logits, targets).item() == pytest.approx(base.mean().item(), abs=1e-12)


@pytest.mark.parametrize("writeback, written", [("strict", 1), ("inclusive", 2)])
def test_ll_cp_writeback(writeback, written):
    # two unknowns with the largest losses; k = ceil(2 · 4 · 0.25) = 2, strict keeps only the larger
    logits = torch.tensor([[4.0, 3.0, -5.0, 1.0], [-4.0, -3.0, -6.0, 2.0]])
    targets = torch.tensor([[-1, -1, -1, 1], [-1, -1, -1, 1]], dtype=torch.int8)
    loss = build_loss("ll_cp", delta_rel=25, writeback=writeback)
    loss.start_epoch(1)
    loss(logits, targets, torch.tensor([7, 2]))
    labels = torch.full((9, 4), -1, dtype=torch.int8)
    assert loss.apply_corrections(labels) == written
    assert labels[7, 0] == 1 and (labels == 1).sum() == written
    if written == 2:
        assert labels[7, 1] == 1


def test_bad_input():
    with pytest.raises(LossInputError, match="delta_rel"):
        build_loss("ll_r", delta_rel=0)
    with pytest.raises(LossInputError, match="delta_rel"):
        build_loss("ll_ct", delta_rel=150)
    with pytest.raises(LossInputError, match="writeback"):
        build_loss("ll_cp", writeback="both")
    logits, targets = torch.zeros(2, 3), torch.tensor([[1, -1, -1], [-1, 1, -1]], dtype=torch.int8)
    with pytest.raises(LossInputError, match="indices"):
        build_loss("ll_cp")(logits, targets)
    with pytest.raises(LossInputError, match="no unknown"):
        build_loss("ll_r")(logits, torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.int8))
    late = build_loss("ll_r", delta_rel=60)
    late.start_epoch(2)  # 120 % of the entries
    with pytest.raises(LossInputError, match="exceeds 100%"):
        late(logits, targets)


def test_state_dict_keeps_epoch():
    loss = build_loss("ll_ct", delta_rel=0.5)
    loss.start_epoch(6)
    other = build_loss("ll_ct", delta_rel=0.5)
    other.load_state_dict(loss.state_dict())
    assert other._epoch == 6 and int(other.state_dict()["epoch"]) == 6


def _run(case_inputs, method, writeback, dtype):
    kwargs = {"delta_rel": case_inputs["delta_rel_percent"]}
    if method == "ll_cp":
        kwargs["writeback"] = writeback
    loss = build_loss(method, **kwargs)
    loss.start_epoch(case_inputs["epoch0"])
    key = "logits_f64" if dtype == torch.float64 else "logits_f32"
    logits = case_inputs[key].clone().requires_grad_(True)
    value = loss(logits, case_inputs["targets_mlic"], case_inputs["indices"])
    value.backward()
    return loss, value, logits.grad


@pytest.mark.parametrize("source, writeback", [("results", "strict"), ("results_bridgegap", "inclusive")])
def test_official_batches(fixture, source, writeback):
    worst = 0.0
    for method, cases in fixture[f"{source}_float64"].items():
        ours = "ll_ct" if method == "ll_cp_as_shipped" else method  # as shipped, their LL-Cp is LL-Ct
        for case, expected in cases.items():
            inputs = fixture["inputs"][case]
            assert inputs["epoch0"] == inputs["epoch_official"] - 1
            loss, value, grad = _run(inputs, ours, writeback, torch.float64)
            assert loss.last_k == (expected["k"] or 0), (method, case)
            if expected["threshold"] is not None:
                assert abs(loss.last_threshold.item() - expected["threshold"].item()) < TOL
            worst = max(worst, abs(value.item() - expected["loss"].item()),
                        (grad - expected["grad_logits"]).abs().max().item())
            if method == "ll_cp":
                assert torch.equal(torch.sort(loss.correction_rows * 100 + loss.correction_cols).values,
                                   torch.sort(expected["correction_dataset_rows"] * 100
                                              + expected["correction_cols"]).values), case
                labels = inputs["label_matrix_mlic"].clone()
                loss.apply_corrections(labels)
                assert torch.equal(labels, expected["label_matrix_after_mlic"]), case
    assert worst < TOL


def test_official_batches_float32(fixture):
    for method, cases in fixture["results_float32"].items():
        ours = "ll_ct" if method == "ll_cp_as_shipped" else method
        for case, expected in cases.items():
            loss, value, grad = _run(fixture["inputs"][case], ours, "strict", torch.float32)
            assert loss.last_k == (expected["k"] or 0)
            assert abs(value.item() - expected["loss"].item()) < 1e-6
            torch.testing.assert_close(grad, expected["grad_logits"], atol=1e-7, rtol=0)


@pytest.mark.parametrize("steps_key, writeback", [("steps_ll_cp", "strict"), ("steps_ll_cp_bridgegap", "inclusive")])
def test_official_ll_cp_run(fixture, steps_key, writeback):
    """Four epochs of LL-Cp: the labels each step reads and the label matrix after every step."""
    run = fixture["ll_cp_sequence"]
    loss = build_loss("ll_cp", delta_rel=run["delta_rel_percent"], writeback=writeback)
    labels = run["label_matrix_mlic_initial"].clone()
    epoch = None
    for plan, expected in zip(run["plan"], run[steps_key], strict=True):
        if plan["epoch0"] != epoch:
            epoch = plan["epoch0"]
            loss.start_epoch(epoch)
        targets = labels[plan["indices"]]
        assert torch.equal(targets, expected["targets_mlic"])
        logits = plan["logits_f64"].clone().requires_grad_(True)
        value = loss(logits, targets, plan["indices"])
        value.backward()
        assert abs(value.item() - expected["loss"].item()) < TOL
        assert (logits.grad - expected["grad_logits"]).abs().max() < TOL
        loss.apply_corrections(labels)
        assert torch.equal(labels, expected["label_matrix_after_mlic"]), (plan["epoch_official"], steps_key)
    assert (labels != run["label_matrix_mlic_initial"]).any()  # the run did correct labels
