"""recipes/spl/*.yaml: every recipe becomes a job through make_job (what ``mlic train --recipe`` runs), and its
loss, built by the engine's one builder from that job's data, runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mlic.config import read_recipe
from mlic.data.labelset import LabelSet
from mlic.engine.job import make_job
from mlic.losses import build_loss_for_data

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "spl").glob("*.yaml"))
CLASSES = {"coco": 80, "voc": 20, "nuswide": 81, "cub": 312}
METHODS = ("ll_r", "ll_ct", "ll_cp", "em", "em_apl", "hill", "splc", "gr", "vlpl", "aevlp")
IMAGES = 24


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One tiny prepared folder per data set, with its number of classes (train, val, test)."""
    folders = {}
    for data_set, k in CLASSES.items():
        folder = tmp_path_factory.mktemp(data_set)
        rng = np.random.RandomState(k)
        for split in ("train", "val", "test"):
            targets = (rng.rand(IMAGES, k) < 0.05).astype(np.int8)
            targets[np.arange(IMAGES), rng.randint(0, k, IMAGES)] = 1  # every image has a positive
            LabelSet([f"c{i}" for i in range(k)], [f"{split}/{i}.jpg" for i in range(IMAGES)], targets,
                     split=split).save(folder / split)
        folders[data_set] = folder
    return folders


def test_every_method_and_data_set_has_a_recipe():
    assert {p.stem for p in RECIPES} == {f"{m}_{d}" for m in METHODS for d in CLASSES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_its_loss(path, prepared, tmp_path):
    method, data_set = path.stem.rsplit("_", 1)
    assert read_recipe(path)["model"]["num_classes"] == CLASSES[data_set]
    teacher = {}
    if method in ("vlpl", "aevlp"):  # a teacher must be named (make_job checks it exists); it is not loaded here
        (tmp_path / "ViT-B-16.pt").write_bytes(b"")
        teacher = {"teacher": tmp_path / "ViT-B-16.pt"}
    job = make_job(data=prepared[data_set], out=tmp_path / "run", recipe=path, observe="single-positive",
                   quiet=True, log=lambda *a: None, **teacher)
    train = job.splits.train
    assert job.train.loss == method and job.model.num_classes == CLASSES[data_set]
    # what the engine does (mlic/engine/loop.py): the loss takes what it needs from the training data
    loss = build_loss_for_data(job.train.loss, job.train.loss_args, train.train_targets, job.train.epochs,
                               job.train.seed, clean=train.targets)
    if method in ("em_apl", "gr"):
        assert loss.num_epochs == job.train.epochs  # the schedule's length is the run's
    if method == "em_apl":
        assert tuple(loss.pseudo_labels.shape) == (IMAGES, CLASSES[data_set])
        assert int(loss.unknown.sum()) == int((np.asarray(train.train_targets) == -1).sum())
    if method == "gr":
        assert "publishes NO per-data-set settings" in yaml.safe_load(path.read_text())["description"]
    if hasattr(loss, "set_pseudo_labels"):  # teacher methods: the engine's teaching step hands a teacher's over
        loss.set_pseudo_labels(torch.tensor(np.asarray(train.targets)))  # here a teacher that is always right
    if hasattr(loss, "start_epoch"):
        loss.start_epoch(job.train.epochs - 1)
    rows = torch.arange(4)
    targets = torch.tensor(np.asarray(train.train_targets)[:4])
    value = loss(torch.randn(4, CLASSES[data_set]), targets, rows)
    assert torch.isfinite(value)
