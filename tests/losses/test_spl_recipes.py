"""recipes/spl/*.yaml: every recipe loads into the typed configs and its loss builds and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mlic.config import ModelConfig, TrainConfig, load_recipe
from mlic.losses import build_loss

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "spl").glob("*.yaml"))
CLASSES = {"coco": 80, "voc": 20, "nuswide": 81, "cub": 312}
METHODS = ("ll_r", "ll_ct", "ll_cp", "em", "em_apl", "hill", "splc", "gr")


def test_every_method_and_data_set_has_a_recipe():
    assert {p.stem for p in RECIPES} == {f"{m}_{d}" for m in METHODS for d in CLASSES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_its_loss(path):
    model_dict, train_dict = load_recipe(path)
    model, train = ModelConfig.from_dict(model_dict), TrainConfig.from_dict(train_dict)
    method, data_set = path.stem.rsplit("_", 1)
    assert train.loss == method and model.num_classes == CLASSES[data_set]
    k = model.num_classes
    targets = torch.full((4, k), -1, dtype=torch.int8)
    targets[torch.arange(4), torch.arange(4)] = 1
    args = dict(train.loss_args)
    if method == "em_apl":
        args.update(num_images=4, num_classes=k, observed=targets)
        assert args["num_epochs"] == train.epochs
    if method == "gr":
        assert args["num_epochs"] == train.epochs
        assert "publishes NO per-data-set settings" in yaml.safe_load(path.read_text())["description"]
    loss = build_loss(method, **args)
    if hasattr(loss, "start_epoch"):
        loss.start_epoch(train.epochs - 1)
    value = loss(torch.randn(4, k), targets, torch.arange(4))
    assert torch.isfinite(value)
