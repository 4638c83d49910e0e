"""A trained mlic classifier wrapped as a teacher: its class scores are its (scaled) logits.

For data sets without a CLIP that knows them (MultiDigits), a stand-in teacher: e.g. a model trained with
full labels on a separate draw. ``teacher(x)`` returns ``logits * scale`` (B, K) float32; a rule's temperature
then plays the role it has on CLIP's cosines (pick ``scale`` so that typical scores sit in [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mlic.teachers import register_teacher
from mlic.teachers.clip import TeacherError


@register_teacher("classifier")
class ClassifierTeacher(nn.Module):
    """A frozen mlic model as a teacher.

    Args:
        weights: an mlic model folder (model.json + model.safetensors) or an ``nn.Module`` (B, 3, S, S) -> (B, K).
        image_size: the input side S (read from the folder's config when not given).
        scale: factor on the logits (the scores a rule sees).
        class_names: the K names the model scores, in order (read from the folder when not given).
    """

    kind = "classifier"

    def __init__(self, weights, image_size: int | None = None, scale: float = 0.1,
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        if isinstance(weights, nn.Module):
            model, meta = weights, {}
        else:
            from mlic.engine.checkpoint import load_model

            if not Path(weights).exists():
                raise TeacherError(f"teacher model {weights}: no such folder")
            model, meta = load_model(weights)
        self.model = model.eval().requires_grad_(False)
        self.scale = float(scale)
        cfg = meta.get("model", {}) if isinstance(meta, dict) else {}
        self.image_size = int(image_size or cfg.get("img_size") or meta.get("img_size", 0) or 0) or None
        self.class_names = list(class_names or meta.get("classes") or []) or None

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def train(self, mode: bool = True) -> ClassifierTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x).float() * self.scale).float()
