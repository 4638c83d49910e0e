"""A classifier is a backbone and a head composed; ``build_model`` makes one from a ModelConfig."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mlic.config import ModelConfig
from mlic.errors import MlicError
from mlic.models.backbones import build_backbone
from mlic.models.heads import HEADS
from mlic.models.weights import PretrainedWeights
from mlic.registry import check_arguments


class Classifier(nn.Module):
    """backbone (B,3,H,W) -> (B,C,h,w) -> head -> logits (B,K)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, K) logits."""
        return self.head(self.backbone(images))


def build_model(config: ModelConfig, pretrained: str | Path | PretrainedWeights | None = None) -> Classifier:
    """Build the classifier a config describes, its backbone with ``pretrained`` weights if given.

    ``pretrained``: a local backbone weight file, ``timm`` or ``hf-hub:ORG/NAME[@REVISION]`` (see
    :func:`mlic.models.backbones.resolve_pretrained`), or the PretrainedWeights that function returned; pass
    those to record their ``source`` and ``sha256`` without resolving and hashing twice.
    """
    if config.head not in HEADS:
        raise MlicError(f"unknown head '{config.head}'; choose one of: {', '.join(sorted(HEADS))}")
    check_arguments(HEADS[config.head], config.head_args, f"head '{config.head}'", "--head-arg", skip=2)
    backbone = build_backbone(config.backbone, pretrained=pretrained, **config.backbone_args)
    head = HEADS[config.head](backbone.num_channels, config.num_classes, **config.head_args)
    return Classifier(backbone, head, config)
