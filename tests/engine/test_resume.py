"""Resume state: refused unless it is tensors and plain containers; every random stream round-trips."""

import random

import numpy as np
import pytest
import torch

from mlic.engine.checkpoint import CheckpointError
from mlic.engine.resume import load_state, rng_state, save_state, set_rng_state, settings_differences


class Evil:
    """Stands for any object a malicious file could make us build."""


def test_state_refuses_arbitrary_objects(tmp_path):
    save_state(tmp_path / "s.pt", {"epoch": 3, "w": torch.ones(2)})
    assert load_state(tmp_path / "s.pt")["epoch"] == 3

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: it holds [\w.]*Evil, not only tensors") as err:
        load_state(tmp_path / "evil.pt")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)  # never PyTorch's advice
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="random.pt: not a checkpoint"):
        load_state(tmp_path / "random.pt")


def test_every_random_stream_round_trips(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_state(tmp_path / "s.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_state(tmp_path / "s.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_settings_differences_name_each_setting():
    saved = {"train": {"lr": 0.01, "loss": "bce"}, "data": {"train": "a"}}
    now = {"train": {"lr": 0.02, "loss": "bce"}, "data": {"train": "b"}}
    assert settings_differences(saved, now) == ["lr was 0.01, now 0.02", "the train data (images or labels) differ"]
