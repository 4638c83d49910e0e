"""Losses for multi-label classification, all called as ``loss(logits, targets, indices=None)``.

Targets use the one encoding of mlic: 1 positive, 0 negative, -1 unknown. Full-label losses
ignore unknown entries; partial-label losses (``partial.py``) define what unknown means.
``indices`` are the dataset row numbers of the batch, for losses that keep per-image state.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mlic.registry import check_arguments

LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a loss to the registry under ``name``; refuses duplicates."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is registered twice")
        LOSSES[name] = cls
        return cls

    return add


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered under ``name`` (e.g. "bce", "asl", "role") with its keyword arguments."""
    key = name.lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(LOSSES))}")
    check_arguments(LOSSES[key], kwargs, f"loss '{key}'", "--loss-arg")
    return LOSSES[key](**kwargs)


from mlic.losses import full  # noqa: E402,F401  (registers bce, bce_ls, focal, asl)

try:  # partial-label losses live in their own module
    from mlic.losses import partial  # noqa: E402,F401
except ImportError:  # pragma: no cover - only while the module is being written
    pass
