"""Feature extraction: pooled backbone features, memory-mapped cache, resume after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mlic.config import ModelConfig
from mlic.data.features import extract_features, load_features, sidecar_path
from mlic.data.labelset import LabelSet
from mlic.models.classifier import build_model


class Interrupted(Exception):
    pass


class CountingBackbone(nn.Module):
    """Wraps a backbone; counts images seen and can fail after a number of forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images_seen = 0
        self.calls = 0
        self.fail_after: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted
        self.calls += 1
        self.images_seen += x.shape[0]
        return self.inner(x)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    paths = []
    for i in range(11):
        name = f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name)
        paths.append(name)
    targets = rng.integers(0, 2, (11, 3)).astype(np.int8)
    return LabelSet(classes=["a", "b", "c"], image_paths=paths, targets=targets, root=str(root), split="train")


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="digitnet", backbone_args={"width": 4}, num_classes=3, img_size=16))


def test_extract_matches_backbone_and_is_cached(images, model, tmp_path):
    out = tmp_path / "feats" / "train.npy"
    feats = extract_features(images, model, out, batch_size=4, progress=False)
    assert isinstance(feats, np.memmap) and feats.shape == (11, 16) and feats.dtype == np.float32
    assert not (tmp_path / "feats" / "train.npy.partial").exists()
    assert not (tmp_path / "feats" / "train.npy.progress.json").exists()
    info = json.loads(sidecar_path(out).read_text())
    assert info["num_images"] == 11 and info["dim"] == 16 and info["bad_rows"] == []

    # one image by hand: eval transform, normalisation, backbone, global average pool
    from mlic.data.images import build_transform, load_image, normalize

    img = build_transform(16, train=False)(load_image(images.path(5)))[None]
    with torch.no_grad():
        model.eval()
        expected = model.backbone(normalize(img, model.config.mean, model.config.std)).mean(dim=(2, 3))
    np.testing.assert_allclose(feats[5], expected[0].numpy(), rtol=1e-5, atol=1e-5)

    counting = CountingBackbone(model.backbone)
    first = extract_features(images, counting, tmp_path / "bare.npy", img_size=16, mean=model.config.mean,
                             std=model.config.std, batch_size=4, progress=False)
    seen = counting.images_seen
    again = extract_features(images, counting, tmp_path / "bare.npy", img_size=16, mean=model.config.mean,
                             std=model.config.std, batch_size=4, progress=False)
    assert counting.images_seen == seen  # served from the cache, no forward pass
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    np.testing.assert_allclose(np.asarray(first), np.asarray(feats), rtol=1e-6, atol=1e-6)

    with torch.no_grad():  # other weights: the cache no longer applies
        next(counting.parameters()).mul_(2)
    changed = extract_features(images, counting, tmp_path / "bare.npy", img_size=16, mean=model.config.mean,
                               std=model.config.std, batch_size=4, progress=False)
    assert counting.images_seen == seen + 1 + 11
    assert not np.allclose(np.asarray(changed), np.asarray(first))


def test_resume_after_interruption(images, model, tmp_path):
    reference = np.asarray(extract_features(images, model, tmp_path / "ref.npy", batch_size=4, progress=False))
    out = tmp_path / "run.npy"
    backbone = CountingBackbone(model.backbone)
    backbone.fail_after = 3  # the size probe + two batches of 4 succeed, the third batch fails
    with pytest.raises(Interrupted):
        extract_features(images, backbone, out, img_size=16, mean=model.config.mean, std=model.config.std,
                         batch_size=4, progress=False)
    marker = json.loads((tmp_path / "run.npy.progress.json").read_text())
    assert marker["done"] == 8 and (tmp_path / "run.npy.partial").exists() and not out.exists()

    backbone.fail_after = None
    backbone.images_seen = 0
    feats = extract_features(images, backbone, out, img_size=16, mean=model.config.mean, std=model.config.std,
                             batch_size=4, progress=False)
    assert backbone.images_seen == 1 + 3  # the size probe and the 3 images left
    np.testing.assert_allclose(np.asarray(feats), reference, rtol=1e-6, atol=1e-6)
    assert not (tmp_path / "run.npy.partial").exists()
    np.testing.assert_array_equal(np.asarray(load_features(out)), np.asarray(feats))


def test_float16_and_bad_images(images, model, tmp_path):
    (images.path(2)).write_bytes(b"not an image")
    feats = extract_features(images, model, tmp_path / "half.npy", batch_size=4, float16=True, progress=False)
    assert feats.dtype == np.float16
    info = json.loads(sidecar_path(tmp_path / "half.npy").read_text())
    assert [b["row"] for b in info["bad_rows"]] == [2]
    assert np.all(feats[2] == 0) and np.any(feats[3] != 0)
    full = extract_features(images, model, tmp_path / "full.npy", batch_size=4, progress=False)
    np.testing.assert_allclose(np.asarray(feats, dtype=np.float32), np.asarray(full), rtol=2e-3, atol=2e-3)
