"""mlic: multi-label image classification from full, partial and single-positive labels.

The public API (each the command of the same name, with its defaults)::

    import mlic
    run = mlic.train(data="data/coco", backbone="resnet50", pretrained="timm", loss="role",
                     observe="single-positive", mode="linear-init", out="runs/x", epochs=10)
    model = mlic.load("runs/x")                 # also .onnx, official Query2Label folders, ML-Decoder .pth
    model.predict(["a.jpg", pil_image], top_k=3)
    metrics = mlic.evaluate(model, data="data/coco", split="test")

Names are imported on first use, so ``import mlic`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "train": "mlic.api", "load": "mlic.api", "evaluate": "mlic.api", "Model": "mlic.api", "Run": "mlic.api",
    "Explanation": "mlic.api", "as_rgb": "mlic.api",
    "TrainConfig": "mlic.config", "ModelConfig": "mlic.config", "MlicError": "mlic.errors",
    "register_loss": "mlic.losses", "register_head": "mlic.models.heads", "register_backbone": "mlic.models.backbones",
    "register_reader": "mlic.data.prepare",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
