import json

import numpy as np
import pytest
import torch

from mlic.config import ModelConfig
from mlic.engine.checkpoint import CheckpointError, load_model, load_state, save_model, save_state
from mlic.models.classifier import build_model


def test_round_trip(tmp_path):
    cfg = ModelConfig(num_classes=3, img_size=32)
    model = build_model(cfg).eval()
    save_model(tmp_path, model, cfg, ["a", "b", "c"], thresholds=[0.1, 0.2, 0.3], extra={"epoch": 4})
    back, meta = load_model(tmp_path)
    assert meta["classes"] == ["a", "b", "c"] and meta["thresholds"] == [0.1, 0.2, 0.3] and meta["epoch"] == 4
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), model(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="model.json: not found"):
        load_model(tmp_path)
    (tmp_path / "checkpoint.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="no config_new.json"):
        load_model(tmp_path)
    (tmp_path / "checkpoint.pkl").unlink()
    cfg = ModelConfig(num_classes=3, img_size=32)
    save_model(tmp_path, build_model(cfg), cfg, ["a", "b", "c"])
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["model"]["num_classes"] = 4
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.json: 3 class names for a model with 4 outputs"):
        load_model(tmp_path)
    meta["classes"].append("d")
    meta["thresholds"].append(0.5)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="3 class names for a model with 4"):
        save_model(tmp_path, build_model(ModelConfig(num_classes=4)), ModelConfig(num_classes=4), ["a", "b", "c"])


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
