"""Shared fixtures: a tiny MultiDigits built once per session, and the path to ../shared."""

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
