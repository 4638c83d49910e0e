"""Shard test fixtures: a small LabelSet of real images, packed once per module, and reading a dataset's rows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlic.data.labelset import LabelSet
from mlic.data.shards import write_shards
from mlic.data.targets import SparseTargets

N, K = 12, 5


def _make_labelset(root, sparse: bool = False, observed: bool = True) -> LabelSet:
    """N real images (640x480 JPEGs and a few PNGs) with random full targets and partial observed labels."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    paths = []
    for i in range(N):
        y, x = np.mgrid[0:480, 0:640]
        pixels = np.stack([(x * (i + 1)) % 256, (y * 3 + i * 20) % 256, (x + y) % 256], -1).astype(np.uint8)
        name = f"img/{i:02d}.{'png' if i % 4 == 3 else 'jpg'}"
        Image.fromarray(pixels).save(root / name)
        paths.append(name)
    targets = rng.integers(0, 2, (N, K)).astype(np.int8)
    obs = np.where(rng.random((N, K)) < 0.5, targets, -1).astype(np.int8) if observed else None
    if sparse:
        targets = SparseTargets.from_dense(targets)
        obs = SparseTargets.from_dense(obs) if obs is not None else None
    return LabelSet([f"c{k}" for k in range(K)], paths, targets, str(root), "train", obs, {"source": "test"})


@pytest.fixture
def make_labelset():
    """``make_labelset(root, sparse=False, observed=True)``: N real images with targets, see :func:`_make_labelset`."""
    return _make_labelset


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    labelset = _make_labelset(root / "data")
    shards = write_shards(labelset, root / "out", shard_size_bytes=150_000, progress=False)
    return labelset, root / "out", shards


def _rows(dataset) -> dict[int, tuple]:
    return {int(index): (image, target, error) for image, target, index, error in dataset}


@pytest.fixture
def rows():
    """``rows(dataset)``: {row index: (image, target, error)} of everything a dataset yields."""
    return _rows
