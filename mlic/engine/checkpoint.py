"""Checkpoints: what a run leaves on disk and how it is read back.

A model directory holds ``model.safetensors`` (weights) and ``model.json`` (the ModelConfig that
rebuilds the model, class names, per-class thresholds, the mlic version, and whatever the
writer adds, e.g. metrics). Both are written atomically. Resume state (``last.pt``: optimizer,
scheduler, EMA, epoch, RNG) is a torch file of tensors and plain containers, read with
``weights_only=True``: nothing a user was handed gets unpickled.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from mlic import __version__
from mlic.config import ModelConfig
from mlic.data.labelset import LabelSet, SparseTargets
from mlic.errors import MlicError
from mlic.io import UnsafeFileError, atomic_write_bytes, check_writable, load_torch_weights
from mlic.models.weights import check_state_dict

RUN_FILES = ("model.safetensors", "model.json", "last.pt", "metrics.jsonl", "test_metrics.json", "test_scores.npy",
             "report.md", "training.png", "per_class_ap.png", "pr_curves.png", "estimated_labels.npy", "features",
             "loss.safetensors", "linear")
"""What a run writes into its folder: a folder holding model.json, last.pt or metrics.jsonl holds a run."""


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
    atomic_write_bytes(directory / "model.safetensors", save(state))
    thresholds = [0.5] * len(classes) if thresholds is None else [float(t) for t in thresholds]
    meta = {
        "mlic_version": __version__,
        "model": config.to_dict(),
        "classes": list(classes),
        "thresholds": thresholds,
        **(extra or {}),
    }
    atomic_write_bytes(directory / "model.json", json.dumps(meta, indent=1).encode())
    return directory


def read_model_meta(directory: str | Path) -> dict:
    """The parsed ``model.json`` of a model directory."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found; --checkpoint must be a run or model folder from mlic, "
                              "an official Query2Label folder (checkpoint.pkl + config_new.json) or an official "
                              "ML-Decoder .pth file")
    try:
        meta = json.loads(meta_path.read_text())
        ModelConfig.from_dict(meta["model"])
        meta["classes"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: not an mlic model description ({e})") from None
    return meta


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
    model = build_model(config)
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{weights}: cannot read weights ({e}); the run may not have finished an epoch") from None
    model.load_state_dict(check_state_dict(state, model, weights, "the model in model.json", error=CheckpointError))
    return model.to(device).eval(), meta


def save_state(path: str | Path, state: dict) -> None:
    """Write resume state (tensors and plain containers) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: str | Path) -> dict:
    """Read resume state written by :func:`save_state`, refusing anything but tensors and containers."""
    try:
        return load_torch_weights(path)
    except UnsafeFileError as e:
        raise CheckpointError(f"{e}; delete it to start the run over") from None


def claim_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``out`` ready for a run: refuse to train over an earlier run by surprise, prove it is writable.

    A folder that holds a run (model.json, last.pt or metrics.jsonl) is continued with ``resume``, or
    cleared of the run's files (:data:`RUN_FILES`, nothing else) with ``overwrite``; otherwise refused.

    Raises:
        CheckpointError: ``out`` holds a run and neither option was given (the message names both).
        OSError: ``out`` cannot be created or written (checked with a real write, before any training).
    """
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: --out is a file; give a folder for the run")
    holds_run = any((out / name).exists() for name in ("model.json", "last.pt", "metrics.jsonl"))
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite contradict each other; choose one")
    if holds_run and not resume:
        if not overwrite:
            raise CheckpointError(f"{out}: holds a run already; continue it with --resume, replace it with "
                                  "--overwrite, or choose another --out")
        for name in RUN_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return check_writable(out, "--out")


def labelset_fingerprint(labelset: LabelSet) -> str:
    """A short hash of a LabelSet's classes, image paths and training targets: "same data" for resume."""
    import hashlib

    h = hashlib.sha1()
    h.update(json.dumps([labelset.classes, labelset.image_paths]).encode())
    targets = labelset.train_targets
    for part in (targets.indptr, targets.indices, targets.values) if isinstance(targets, SparseTargets) else (targets,):
        h.update(np.ascontiguousarray(part).tobytes())  # sparse: its CSR parts, never the dense matrix
    return h.hexdigest()[:16]


def settings_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two run settings ({"model": …, "train": …, "data": …})."""
    out = []
    for section in ("model", "train", "data"):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                if section == "data":
                    out.append(f"the {key} data (images or labels) differ")
                else:
                    out.append(f"{key.replace('_', '-')} was {old.get(key)!r}, now {new.get(key)!r}")
    return out


def convert_query2label(folder: str | Path, out_dir: str | Path, classes: list[str] | None = None) -> Path:
    """Convert an official Query2Label release folder (checkpoint.pkl + config_new.json) into an mlic model
    directory (``model.safetensors`` + ``model.json``); ``classes`` default to COCO's 80 when num_class is 80."""
    from mlic.models.official import load_release, read_official_config

    folder = Path(folder)
    model, classes, config_path = load_release(folder, classes)
    extra = {"source": {"repo": "SlongLiu/query2labels", "folder": str(folder),
                        "config": read_official_config(config_path)}}
    return save_model(out_dir, model, model.config, list(classes), extra=extra)


def convert_ml_decoder(path: str | Path, out_dir: str | Path, classes: list[str] | None = None,
                       img_size: int | None = None) -> Path:
    """Convert an authors' ML-Decoder ``.pth`` into an mlic model folder; arguments as
    :func:`mlic.models.official.load_ml_decoder`."""
    from mlic.models.official import load_ml_decoder

    model, classes = load_ml_decoder(path, classes, img_size)
    extra = {"source": {"repo": "Alibaba-MIIL/ML_Decoder", "file": str(path)}}
    return save_model(out_dir, model, model.config, classes, extra=extra)
