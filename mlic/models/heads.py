"""Heads: modules mapping feature maps (B, C, h, w) to logits (B, K).

Registered in ``HEADS`` under the names a ModelConfig uses; each is built as
``HEADS[name](in_channels, num_classes, **head_args)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str) -> Callable:
    """Decorator adding a head class under ``name``; refuses duplicates."""

    def add(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in HEADS:
            raise ValueError(f"head '{name}' is registered twice")
        HEADS[name] = cls
        return cls

    return add


@register_head("linear")
class LinearHead(nn.Module):
    """Global average pooling followed by one linear layer.

    Args:
        in_channels: C of the feature map.
        num_classes: K.
        dropout: dropout before the linear layer.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) or pooled (B, C) features -> (B, K) logits."""
        pooled = features.mean(dim=(2, 3)) if features.ndim == 4 else features
        return self.fc(self.dropout(pooled))
