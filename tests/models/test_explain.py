"""Attention maps of Query2Label models and the PNG that shows them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlic.config import ModelConfig
from mlic.models.classifier import build_model
from mlic.models.explain import attention_maps, write_attention_png

CLASSES = ["cat", "dog", "car", "tree", "boat"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", head="query2label", num_classes=5, img_size=64,
                         head_args={"hidden_dim": 32, "dim_feedforward": 64, "nheads": 4})
    return build_model(config).eval()


def test_attention_maps(model):
    images = torch.randn(3, 3, 64, 96)
    maps = attention_maps(model, images)
    assert maps.shape == (3, 5, 2, 3)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, 5))
    logits, same = attention_maps(model, images, return_logits=True)
    torch.testing.assert_close(same, maps)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), atol=1e-5, rtol=0)


def test_attention_maps_need_query2label():
    linear = build_model(ModelConfig(backbone="resnet18", head="linear", num_classes=5, img_size=64)).eval()
    with pytest.raises(ValueError, match="query2label"):
        attention_maps(linear, torch.randn(1, 3, 64, 64))


def test_write_attention_png(model, tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8))
    out = tmp_path / "explain" / "grid.png"
    shown = write_attention_png(model, image, out, CLASSES, thresholds=0.0)
    assert [name for name, _ in shown] != [] and len(shown) == 5
    scores = [score for _, score in shown]
    assert scores == sorted(scores, reverse=True)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 200
    path = tmp_path / "img.png"
    image.save(path)
    chosen = write_attention_png(model, path, tmp_path / "two.png", CLASSES, labels=[3, 1])
    assert [name for name, _ in chosen] == ["tree", "dog"]
    none_pass = write_attention_png(model, image, tmp_path / "none.png", CLASSES, thresholds=[1.1] * 5)
    assert len(none_pass) == 3
    with pytest.raises(ValueError, match="class names"):
        write_attention_png(model, image, tmp_path / "bad.png", CLASSES[:2])
