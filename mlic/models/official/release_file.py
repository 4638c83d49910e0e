"""Reading an official release file without running pickled code, and the strict check of a mapped state dict.

A release is a torch pickle (Query2Label ``checkpoint.pkl``, ML-Decoder ``*.pth``) whose weights sit under
``state_dict`` or ``model``, keys possibly prefixed ``module.``; after mapping, the key set and every shape
must equal our model's exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from mlic.io import UnsafeFileError, load_torch_weights
from mlic.models.backbones import strip_prefixes
from mlic.models.weights import WeightsError, check_state_dict


def _safe_globals() -> list:
    """Harmless globals a training script may pickle next to the weights: its arguments, numpy scalars."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list = [argparse.Namespace, np.dtype, (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                     (core.multiarray.scalar, "numpy._core.multiarray.scalar")]
    for name in ("float64", "float32", "float16", "int64", "int32", "bool"):
        kind = type(np.dtype(name))
        allowed += [(kind, f"numpy.dtypes.{kind.__name__}")]
    return allowed


class OfficialCheckpointError(WeightsError):
    """An official checkpoint or config cannot be read or does not fit; the message names the file."""


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of an official ``checkpoint.pkl`` without running arbitrary pickled code.

    Uses ``torch.load(weights_only=True)``: only tensors, plain containers and a few harmless
    types (argparse.Namespace, numpy scalars) are accepted. The state dict is taken from
    ``state_dict`` or ``model`` (or the file itself); ``module.`` prefixes are stripped.
    """
    return state_dict_of(read_official_file(path), path)


def read_official_file(path: str | Path) -> object:
    """The object in a torch pickle, read with ``weights_only=True`` (see :func:`read_official_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: checkpoint not found")
    try:
        obj = load_torch_weights(path, _safe_globals())
    except UnsafeFileError as e:
        raise OfficialCheckpointError(str(e)) from None
    return obj


def state_dict_of(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint object: under ``state_dict`` or ``model``, or the object itself."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialCheckpointError(f"{path}: no state dict of tensors found (looked at 'state_dict', 'model')")
    return strip_prefixes(dict(obj))


def check_against_model(
    mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
) -> None:
    """Strict check: the same keys as ``expected`` (our model's state dict) and equal shapes."""
    check_state_dict(mapped, expected, source, "the model its config describes", error=OfficialCheckpointError)
