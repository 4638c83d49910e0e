"""Checkpoints: what a run leaves on disk and how it is read back.

A model directory holds ``model.safetensors`` (weights) and ``model.json`` (the ModelConfig that
rebuilds the model, class names, per-class thresholds, the mlic version, and whatever the
writer adds, e.g. metrics). Both are written atomically. Resume state (``last.pt``: optimizer,
scheduler, EMA, epoch, RNG) is a torch file of tensors and plain containers, read with
``weights_only=True``: nothing a user was handed gets unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from mlic import __version__
from mlic.config import ModelConfig
from mlic.errors import MlicError
from mlic.io import atomic_write_bytes
from mlic.models.weights import check_state_dict

WRITE_ID = "mlic_write_id"
"""The safetensors metadata key that pairs model.safetensors with its model.json."""


class CheckpointError(MlicError):
    """A checkpoint is missing, unreadable or does not fit; the message names the file and the fix."""


def save_model(
    directory: str | Path, model: torch.nn.Module, config: ModelConfig, classes: list[str],
    thresholds: np.ndarray | list[float] | None = None, extra: dict | None = None,
) -> Path:
    """Write weights and metadata of ``model`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(classes) != config.num_classes:
        raise CheckpointError(f"{len(classes)} class names for a model with {config.num_classes} outputs")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # one id in both files, a hash of the weights: a kill between the two writes leaves a pair that load_model
    # refuses, never new weights silently beside old thresholds; the same weights give the same bytes
    write_id = weights_id(state)
    thresholds = [0.5] * len(classes) if thresholds is None else [float(t) for t in thresholds]
    meta = {
        "mlic_version": __version__,
        "model": config.to_dict(),
        "classes": list(classes),
        "thresholds": thresholds,
        "weights_id": write_id,
        **(extra or {}),
    }
    check_model_meta(meta, directory / "model.json")
    atomic_write_bytes(directory / "model.safetensors", save(state, metadata={WRITE_ID: write_id}))
    atomic_write_bytes(directory / "model.json", json.dumps(meta, indent=1).encode())
    return directory


def weights_id(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names, dtypes, shapes and bytes."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return h.hexdigest()[:32]


def check_class_names(classes, source, error: type[MlicError] = MlicError) -> list[str]:
    """A model's class names: a non-empty list under the one rule of :func:`mlic.data.labelset.check_class_names`."""
    from mlic.data.labelset import LabelSetError
    from mlic.data.labelset import check_class_names as check_names

    if not isinstance(classes, list) or not classes:
        raise error(f"{source}: 'classes' must be a non-empty list of class names")
    try:
        return check_names(classes, str(source))
    except LabelSetError as e:
        raise error(str(e)) from None


def check_model_meta(meta, source, num_outputs: int | None = None, error: type[MlicError] = CheckpointError) -> dict:
    """Check a model description (``model.json``, ONNX metadata) before anything is allocated from it.

    Args:
        meta: the parsed description: ``classes``, ``thresholds`` and, for model.json, ``model``.
        source: the file, named in every message.
        num_outputs: the model's output count where known (ONNX); else ``meta["model"]["num_classes"]``.
        error: the error class to raise.

    Raises:
        ``error``: one line naming the file and the field that is wrong.
    """
    if not isinstance(meta, dict):
        raise error(f"{source}: not an mlic model description (a JSON object with model, classes, thresholds)")
    classes = check_class_names(meta.get("classes"), source, error)
    if num_outputs is None and "model" in meta:
        num_outputs = meta["model"].get("num_classes") if isinstance(meta["model"], dict) else None
    if num_outputs is not None and num_outputs != len(classes):
        raise error(f"{source}: {len(classes)} class names for a model with {num_outputs} outputs; the file is "
                    "damaged or was edited - use the file the model was saved with")
    thresholds = meta.get("thresholds")
    if thresholds is not None:
        ok = isinstance(thresholds, list) and len(thresholds) == len(classes) and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds)
        if not ok:
            raise error(f"{source}: 'thresholds' must be {len(classes)} numbers from 0 to 1, one per class")
    return meta


def read_model_meta(directory: str | Path) -> dict:
    """The parsed ``model.json`` of a model directory."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found; --checkpoint must be a run or model folder from mlic, "
                              "an official Query2Label folder (checkpoint.pkl + config_new.json) or an official "
                              "ML-Decoder .pth file")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({str(e).splitlines()[0][:80]}); the file is damaged - "
                              "use the model folder as mlic wrote it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{meta_path}: not an mlic model description (no 'model' section)")
    try:
        ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: its 'model' section is not a model config ({str(e)[:160]})") from None
    return check_model_meta(meta, meta_path)


def load_official(path: Path) -> tuple[torch.nn.Module, dict]:
    """An official release, imported strictly: a Query2Label folder (checkpoint.pkl + config_new.json) or an
    ML-Decoder ``.pth`` file (class names from the file, else COCO's)."""
    from mlic.models.official import load_ml_decoder, load_release

    if path.is_file() and path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: pass the folder holding model.safetensors and model.json ({path.parent})")
    if path.is_file() and path.name != "checkpoint.pkl":
        model, classes = load_ml_decoder(path)
    else:  # a Query2Label folder, or its checkpoint.pkl
        model, classes, _ = load_release(path.parent if path.is_file() else path)
    return model, {"classes": classes, "thresholds": [0.5] * len(classes), "model": model.config.to_dict(),
                   "source": str(path)}


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved in ``directory``; returns (model in eval mode, metadata).

    An official Query2Label release folder (checkpoint.pkl + config_new.json, no model.json), with COCO's
    class names, or an official ML-Decoder ``.pth`` file is imported on the fly.
    """
    from mlic.models.classifier import build_model

    directory = Path(directory)
    if directory.is_file() or (not (directory / "model.json").exists() and (directory / "checkpoint.pkl").exists()):
        model, meta = load_official(directory)
        return model.to(device).eval(), meta
    meta = read_model_meta(directory)
    config = ModelConfig.from_dict(meta["model"])
    weights = directory / "model.safetensors"
    shapes, weights_meta = read_safetensors_header(weights)
    if meta.get("weights_id") and weights_meta.get(WRITE_ID) != meta["weights_id"]:
        raise CheckpointError(f"{directory}: model.safetensors and model.json are from two different saves (one was "
                              "interrupted); rerun or --resume the training that writes this folder")
    described = f"the model in {directory / 'model.json'}"
    try:
        with torch.device("meta"):  # the shapes the description implies, before any memory is allocated
            skeleton = build_model(config)
    except MlicError as e:
        raise CheckpointError(f"{directory / 'model.json'}: {e}") from None
    except Exception:  # noqa: BLE001 - some timm models cannot be built on the meta device; build for real below
        skeleton = None
    if skeleton is not None:
        check_state_dict(shapes, skeleton, weights, described, error=CheckpointError)
    try:
        model = build_model(config)
    except MlicError as e:
        raise CheckpointError(f"{directory / 'model.json'}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{directory / 'model.json'}: the model it describes cannot be built "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{weights}: cannot read weights ({e}); the run may not have finished an epoch") from None
    model.load_state_dict(check_state_dict(state, model, weights, described, error=CheckpointError))
    return model.to(device).eval(), meta


def read_safetensors_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as meta tensors (shapes only, nothing read) and its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; the run may not have finished an epoch") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure becomes one line
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:120]}); the run may not "
                              "have finished an epoch") from None
