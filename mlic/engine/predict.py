"""Prediction from a saved model: images in, labels with scores out (CLI, Python, services)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlic.data.images import ImageError, build_transform, normalize, read_image
from mlic.engine.checkpoint import load_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image paths; a missing input is an error."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise ImageError(f"{item}: no such file or folder")
    return paths


@dataclass
class Prediction:
    """Scores of one image; ``labels`` are the classes at or above their threshold, best first."""

    path: str
    scores: np.ndarray
    labels: list[tuple[str, float]]
    error: str | None = None


class Predictor:
    """A loaded model with its classes, thresholds and input transform.

    Example:
        >>> predictor = Predictor("runs/demo")
        >>> predictor.predict(["photo.jpg"])[0].labels
    """

    def __init__(self, checkpoint: str | Path, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_model(checkpoint, self.device)
        self.config = self.model.config
        self.classes: list[str] = self.meta["classes"]
        self.thresholds = np.asarray(self.meta.get("thresholds") or [0.5] * len(self.classes), dtype=np.float64)
        self.transform = build_transform(self.config.img_size, train=False)

    def tensor(self, images: list[Image.Image | torch.Tensor]) -> torch.Tensor:
        """PIL images or transformed uint8 tensors -> normalised (B, 3, S, S) batch on the model's device."""
        batch = torch.stack([self.transform(im) for im in images]).to(self.device)
        return normalize(batch, self.config.mean, self.config.std)

    @torch.no_grad()
    def scores(self, images: list[Image.Image | torch.Tensor]) -> np.ndarray:
        """Sigmoid scores (B, K) for RGB PIL images (or uint8 tensors from :func:`read_image`)."""
        return torch.sigmoid(self.model(self.tensor(images)).float()).cpu().numpy()

    def labels(self, scores: np.ndarray, threshold: float | None = None, top_k: int | None = None):
        """(class, score) pairs at or above the threshold (per class unless given), best first."""
        thr = self.thresholds if threshold is None else np.full(len(self.classes), threshold)
        order = np.argsort(-scores)
        chosen = [(self.classes[k], float(scores[k])) for k in order if scores[k] >= thr[k]]
        return chosen[:top_k] if top_k else chosen

    def predict(self, paths: list[str | Path], batch_size: int = 32, threshold: float | None = None,
                top_k: int | None = None) -> list[Prediction]:
        """Predict files; an unreadable file yields a Prediction with ``error`` set and no labels."""
        out: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images, good = [], []
            for p in chunk:
                try:
                    images.append(read_image(p, self.transform))  # the decode training and eval use
                    good.append(p)
                except ImageError as e:
                    out.append(Prediction(str(p), np.full(len(self.classes), np.nan), [], str(e)))
            if images:
                for p, s in zip(good, self.scores(images)):
                    out.append(Prediction(str(p), s, self.labels(s, threshold, top_k)))
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(out, key=lambda r: order[r.path])
