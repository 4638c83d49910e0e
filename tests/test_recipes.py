"""Every recipe in recipes/ reads, and each of its sections builds the config it describes."""

from pathlib import Path

import pytest

from mlic.config import ModelConfig, TrainConfig, read_recipe
from mlic.engine.job import MODES

ROOT = Path(__file__).parents[1] / "recipes"
RECIPES = sorted(p for p in ROOT.rglob("*.yaml") if "sweeps" not in p.relative_to(ROOT).parts)
"""Training recipes; recipes/sweeps/ holds sweep files, read by mlic.sweep (tests/test_sweep.py)."""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_builds_its_configs(path):
    sections = read_recipe(path)
    assert sections["description"] and len(sections["description"]) > 80
    assert (sections["mode"] or "finetune") in MODES
    ModelConfig.from_dict(sections["model"] or {})
    TrainConfig.from_dict(sections["train"] or {})
    TrainConfig.linear_defaults(**(sections["linear"] or {}))


def test_cole_recipes_are_their_protocol():
    linear = read_recipe(Path(__file__).parents[1] / "recipes/cole/role_linear_coco.yaml")
    init = read_recipe(Path(__file__).parents[1] / "recipes/cole/role_linear_init_coco.yaml")
    assert linear["mode"] == "linear" and init["mode"] == "linear-init"
    assert linear["linear"] == init["linear"] and linear["linear"]["batch_size"] == 16
    finetune = TrainConfig.from_dict(init["train"])
    assert (finetune.batch_size, finetune.lr, finetune.epochs, finetune.schedule) == (16, 1e-5, 10, "constant")
