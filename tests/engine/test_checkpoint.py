import json

import pytest
import torch

from mlic.config import ModelConfig
from mlic.engine.checkpoint import CheckpointError, load_model, save_model
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


def saved(tmp_path, name="m"):
    cfg = ModelConfig(num_classes=3, img_size=32)
    return save_model(tmp_path / name, build_model(cfg), cfg, ["a", "b", "c"])


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["model"].update(num_classes=10**9), "3 class names for a model with 1000000000 outputs"),
    (lambda m: m["model"].update(backbone_args={"bogus": 1}), "cannot be built"),
    (lambda m: m["model"].update(head_args={"bogus": 1}), "bogus"),
    (lambda m: m.update(thresholds=[0.5, 0.5]), "'thresholds' must be 3 numbers from 0 to 1"),
    (lambda m: m.update(thresholds="0.5"), "'thresholds' must be 3 numbers"),
    (lambda m: m.update(thresholds=[0.5, None, 0.5]), "'thresholds' must be 3 numbers"),
    (lambda m: m.update(thresholds=[0.5, 7, 0.5]), "'thresholds' must be 3 numbers from 0 to 1"),
    (lambda m: m.update(classes=["a", "b"]), "2 class names for a model with 3 outputs"),
    (lambda m: m.update(classes=["a", "b", "c", "d"]), "4 class names for a model with 3 outputs"),
    (lambda m: m.update(classes=["a", "b\nc", "d"]), "class names must be non-empty strings on one line"),
    (lambda m: m.update(classes=["a", 2, "d"]), "class 1 (2) is not a string (int)"),
    (lambda m: m.update(classes=["a", "a", "d"]), "class 'a' appears twice"),
    (lambda m: m.update(classes="abc"), "'classes' must be a non-empty list"),
    (lambda m: m.pop("model"), "no 'model' section"),
    (lambda m: m["model"].update(img_size="big"), "--img-size big"),
])
def test_a_damaged_description_is_one_line_before_anything_is_allocated(tmp_path, edit, fragment):
    folder = saved(tmp_path)
    meta = json.loads((folder / "model.json").read_text())
    edit(meta)
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.json") as err:
        load_model(folder)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_broken_json_and_a_half_saved_pair_are_refused(tmp_path):
    folder = saved(tmp_path)
    good = (folder / "model.json").read_bytes()
    (folder / "model.json").write_bytes(good[:40])
    with pytest.raises(CheckpointError, match="model.json: not valid JSON"):
        load_model(folder)
    (folder / "model.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="model.json: not valid JSON"):
        load_model(folder)
    (folder / "model.json").write_bytes(good)
    other = saved(tmp_path, "other")  # a second save: new weights, as after the next best epoch
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors and model.json are from two different saves"):
        load_model(folder)
