"""Reading weight files and the one strict check every loader uses (checkpoints, backbones, importers)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from mlic.errors import MlicError
from mlic.io import UnsafeFileError, load_torch_weights


class WeightsError(MlicError):
    """A weight file cannot be read or does not fit the model; the message names the file."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a local ``.safetensors`` or torch file without unpickling arbitrary objects.

    A torch file may hold the state dict itself or under ``state_dict`` / ``model`` / ``module``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any decoding failure becomes one clear line
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {reason})") from None
    try:
        obj = load_torch_weights(path)
    except UnsafeFileError as e:
        raise WeightsError(str(e)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return obj


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> dict:
    """Remove wrapper prefixes left by DDP and torch.compile."""
    out = {}
    for k, v in state_dict.items():
        for p in prefixes:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, torch.Tensor],
                     source: str | Path, what: str = "the model", ignore: Callable[[str], bool] | None = None,
                     error: type[MlicError] = WeightsError) -> dict[str, torch.Tensor]:
    """The one strict state-dict check: the same keys as ``model``'s state dict, each of the same shape.

    Args:
        state: the weights read from ``source``.
        model: the module (or its state dict) they must fit.
        source: the file, named in the message.
        what: what the weights are for, e.g. "this backbone; check --backbone".
        ignore: keys of ``model`` that may be absent (e.g. a classifier that is replaced).
        error: the error class to raise.

    Returns:
        ``state`` as a dict, ready for ``load_state_dict(..., strict=not ignore)``.

    Raises:
        ``error``: one line naming the file and up to three keys of each kind of misfit.
    """
    own = model.state_dict() if isinstance(model, nn.Module) else model
    ignored = ignore or (lambda key: False)
    missing = sorted(k for k in own if k not in state and not ignored(k))
    unexpected = sorted(k for k in state if k not in own)
    shape = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape:
        parts = []
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                detail = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in keys[:3]] \
                    if kind == "shape mismatch" else keys[:3]
                parts.append(f"{len(keys)} {kind}: {detail}{' ...' if len(keys) > 3 else ''}")
        raise error(f"{source}: weights do not fit {what} (" + "; ".join(parts) + ")")
    return dict(state)
