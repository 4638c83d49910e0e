"""Shared fixtures: a tiny MultiDigits built once per session (and packed into shards), the path to ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """MultiDigits with 160 train / 48 val / 48 test images of 32 px, in a session cache folder."""
    from mlic.data.digits import DigitsSpec, build_multidigits

    cache = tmp_path_factory.mktemp("mlic-cache")
    spec = DigitsSpec(train=160, val=48, test=48, img_size=32, seed=3)
    return build_multidigits(cache, spec), cache, spec


@pytest.fixture
def digit_shards(tiny_digits):
    """Pack the tiny MultiDigits into shards under a folder: ``digit_shards(root)`` returns ``root / "shards"``
    (train/ val/ test/, several shards each); the prepared folder it packs is ``root / "prep"``."""
    from mlic.data.shards import prepare_shards

    def pack(root, shard_size="20KB"):
        for name in ("train", "val", "test"):
            tiny_digits[0][name].save(root / "prep" / name)
        prepare_shards(root / "prep", root / "shards", shard_size, progress=False)
        return root / "shards"

    return pack


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/mlic from tests."""
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def official_fixture():
    """Loader of the official code's outputs in ../shared/fixtures; skips, saying where it looked, when absent."""
    import torch

    def load(name: str) -> dict:
        path = SHARED / "fixtures" / name
        if not path.is_file():
            pytest.skip(f"official fixture not found at {path} (shared/fixtures is not checked out here)")
        return torch.load(path, weights_only=False)  # our own trusted file, with its metadata

    return load


@pytest.fixture(scope="session")
def value_and_grad():
    """``value_and_grad(loss, logits, targets, indices)``: the loss value and d loss / d logits, in float64."""

    def compute(loss, logits, targets, indices):
        logits = logits.clone().double().requires_grad_(True)
        value = loss(logits, targets, indices)
        value.backward()
        return value.detach(), logits.grad

    return compute
