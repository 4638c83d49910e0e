"""AEVLP's GPR loss: every official loop step and direct case (1e-8, float64), the schedule, state, bad input."""

from __future__ import annotations

import pytest
import torch

from mlic.losses import LOSSES, LossInputError, build_loss

TOL = 1e-8


@pytest.fixture(scope="module")
def fixture(official_fixture):
    return official_fixture("aevlp_official.pt")


def built(hp: dict, **extra):
    return build_loss("aevlp", num_epochs=hp["num_epochs"], linear_init=hp["linear_init"], beta=hp["beta"],
                      alpha=hp["alpha"], q=hp["q2q3"], lam=hp["lam"], rho=hp["rho"], reg=hp["reg"],
                      expected_positives=hp["expected_num_pos"], **extra)


def test_registered_with_metadata():
    cls = LOSSES["aevlp"]
    assert cls.labels == "single positive" and "ICCV 2025" in cls.paper and "GCN" in cls.teacher


@pytest.mark.parametrize("name", ["coco", "pascal"])
def test_official_loops(fixture, name, value_and_grad):
    loop = fixture["loops"][name]
    hp = loop["hparams"]
    n, k = loop["targets_mlic"].shape
    loss = built(hp)
    schedule = {s["epoch0"]: (s["w"], s["b"], s["mu"], s["sigma"]) for s in loop["schedule"]}
    epochs = set()
    for step in loop["steps"]:
        loss.start_epoch(step["epoch0"])
        epochs.add(step["epoch0"])
        assert loss.schedule_values() == pytest.approx(schedule[step["epoch0"]], abs=1e-12)
        pl = torch.zeros(n, k, dtype=torch.int8)
        pl[step["idx"]] = step["pseudo_labels"]
        loss.set_pseudo_labels(pl)
        value, grad = value_and_grad(loss, step["logits"], step["targets_mlic"], step["idx"])
        assert abs(value.item() - step["loss"].item()) <= TOL
        assert (grad - step["grad_logits"]).abs().max() <= TOL
    assert epochs == set(range(hp["num_epochs"]))


def test_official_direct_cases(fixture, value_and_grad):
    d = fixture["direct"]
    for name, case in d["cases"].items():
        loss = built(d["hparams"], use_pl=case["use_pl"])
        loss.start_epoch(case["epoch0"])
        loss.set_pseudo_labels(case["pseudo_labels"])
        idx = torch.arange(case["logits"].shape[0])
        value, grad = value_and_grad(loss, case["logits"], case["targets_mlic"], idx)
        assert abs(value.item() - case["loss"].item()) <= TOL, name
        assert (grad - case["grad_logits"]).abs().max() <= TOL, name


def test_use_pl_false_needs_no_teacher():
    loss = build_loss("aevlp", use_pl=False)
    assert not loss.needs_teacher
    logits = torch.zeros(2, 3, requires_grad=True)
    loss(logits, torch.tensor([[1, -1, -1], [-1, 1, 0]], dtype=torch.int8), torch.tensor([0, 1])).backward()
    assert logits.grad is not None


def test_state_dict_resume():
    loss = build_loss("aevlp", num_epochs=8)
    pl = torch.randint(0, 2, (6, 4), dtype=torch.int8)
    loss.set_pseudo_labels(pl)
    loss.start_epoch(3)
    restored = build_loss("aevlp", num_epochs=8)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.pseudo_labels, pl) and restored.schedule_values() == loss.schedule_values()


def test_bad_input():
    with pytest.raises(LossInputError, match="lam"):
        build_loss("aevlp", lam=[0.7])
    with pytest.raises(LossInputError, match="num_epochs=8"):
        build_loss("aevlp", num_epochs=8).start_epoch(8)
    loss = build_loss("aevlp")
    with pytest.raises(LossInputError, match="add --teacher"):
        loss(torch.zeros(1, 3), torch.tensor([[1, -1, -1]], dtype=torch.int8), torch.tensor([0]))
