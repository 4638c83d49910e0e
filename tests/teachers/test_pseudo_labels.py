"""The pseudo-label rules against the official VLPL and AEVLP fixtures (exact), their bug options, bad input."""

from __future__ import annotations

import pytest
import torch

from mlic.errors import MlicError
from mlic.teachers import RULES, pseudo_labels


@pytest.fixture(scope="module")
def vlpl(official_fixture):
    return official_fixture("vlpl_official.pt")


@pytest.fixture(scope="module")
def aevlp(official_fixture):
    return official_fixture("aevlp_official.pt")


def aevlp_args(hp: dict) -> dict:
    return {"temperature": hp["temp"], "eta": hp["eta"], "top_k": hp["top_k"], "threshold": hp["threshold"],
            "negative_ratio": hp["negative_ratio"]}


def test_rules_registered():
    assert {"vlpl", "aevlp"} <= set(RULES)


def test_vlpl_rule_cases(vlpl):
    names = []
    for case in vlpl["rules"]:
        pl = pseudo_labels("vlpl", case["sims"], case["observed"], temperature=case["temperature"],
                           threshold=case["threshold"], partial=case["partial"])
        assert pl.dtype == torch.int8 and torch.equal(pl, case["pseudo_labels"]), case["name"]
        names.append(case["name"])
    assert any("ties" in n for n in names) and any("partial1.0" in n for n in names)


def test_vlpl_teacher_and_run_steps(vlpl):
    t = vlpl["teacher"]
    assert torch.equal(pseudo_labels("vlpl", t["sims"], None, temperature=t["temperature"], threshold=t["threshold"]),
                       t["pseudo_labels"])
    for run in vlpl["runs"].values():
        hp = run["hparams"]
        for step in run["steps"]:
            pl = pseudo_labels("vlpl", step["sims"], step["targets_mlic"], temperature=hp["temp"],
                               threshold=hp["threshold"], partial=hp["partial"])
            assert torch.equal(pl, step["pseudo_labels"])


def test_vlpl_observed_not_used():
    sims = torch.tensor([[0.30, 0.29, 0.10, 0.31]])
    a = pseudo_labels("vlpl", sims, torch.tensor([[1, -1, -1, -1]], dtype=torch.int8))
    b = pseudo_labels("vlpl", sims, None)
    assert torch.equal(a, b)


def test_aevlp_rule_cases(aevlp):
    for name, case in aevlp["pseudo_label_cases"].items():
        pl = pseudo_labels("aevlp", case["sims"], case["targets"], **aevlp_args(case["hp"]))
        assert pl.dtype == torch.int8 and torch.equal(pl, case["pseudo_labels"]), name


def test_aevlp_loop_steps(aevlp):
    for loop in aevlp["loops"].values():
        for step in loop["steps"]:
            pl = pseudo_labels("aevlp", step["sims"], step["targets_mlic"], **aevlp_args(loop["hparams"]))
            assert torch.equal(pl, step["pseudo_labels"])


def test_aevlp_bug_options(aevlp):
    case = aevlp["pseudo_label_cases"]["negatives"]
    args = aevlp_args(case["hp"])
    official = pseudo_labels("aevlp", case["sims"], case["targets"], **args)
    # the intended negatives: the cleared classes become -1 (an erased positive becomes a negative)
    negatives = pseudo_labels("aevlp", case["sims"], case["targets"], **args, pseudo_negatives=True)
    n = int(args["negative_ratio"] * case["sims"].shape[2])
    assert ((negatives == -1).sum(1) == n).all()
    assert torch.equal(negatives.clamp(min=0), official)
    # no negative step: no erasure of positives
    kept = pseudo_labels("aevlp", case["sims"], case["targets"], **{**args, "negative_ratio": 0.0})
    assert (kept >= official).all() and (kept > official).any()
    # logit_scale multiplies the sims before the temperature
    scaled = pseudo_labels("aevlp", case["sims"] / 100, case["targets"], **args, logit_scale=100.0)
    assert torch.equal(scaled, official)


def test_bad_input():
    with pytest.raises(MlicError, match="unknown pseudo-label rule 'nope'"):
        pseudo_labels("nope", torch.zeros(1, 3))
    with pytest.raises(MlicError, match="not a setting of pseudo-label rule 'vlpl'"):
        pseudo_labels("vlpl", torch.zeros(1, 3), None, eta=0.1)
    with pytest.raises(MlicError, match=r"\(B, V, K\)"):
        pseudo_labels("aevlp", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(MlicError, match="observed labels have shape"):
        pseudo_labels("aevlp", torch.zeros(2, 5, 3), torch.zeros(2, 4))
