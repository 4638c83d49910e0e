"""Backbone features of a LabelSet, extracted once and cached as a memory-mapped ``.npy``.

``extract_features`` runs a backbone (a Classifier's ``.backbone``, or any module mapping images
(B, 3, H, W) to feature maps (B, C, h, w) or vectors (B, C)) over every image in order, global-
average-pools the maps, and writes rows into ``<name>.npy.partial`` (a preallocated ``.npy``
opened with ``open_memmap``). After each batch the rows are flushed and a progress marker
(``<name>.npy.progress.json``: rows done + a fingerprint of images, model and settings) is
replaced atomically, so an interrupted run continues where it stopped. When every row is written
the partial file is renamed onto ``<name>.npy`` (atomic) and a sidecar ``<name>.json`` records
what was extracted. A later call with the same images, model and settings returns the cached
array without recomputing.

Images that cannot be decoded get an all-zero row and are listed in the sidecar (``bad_rows``),
so one bad file never ends a long extraction.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from mlic.config import IMAGENET_MEAN, IMAGENET_STD
from mlic.data.images import BadImageCheck, ImageDataset, build_transform, make_loader, normalize
from mlic.data.labelset import LabelSet
from mlic.errors import MlicError
from mlic.io import atomic_write_bytes
from mlic.progress import progress_bar

FEATURES_FORMAT = 1


def pooled_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> global-average-pooled features (B, C), float32."""
    out = backbone(images)
    if out.ndim == 4:
        out = out.mean(dim=(2, 3))
    elif out.ndim == 3:  # tokens (B, N, C)
        out = out.mean(dim=1)
    return out.float()


def model_fingerprint(module: nn.Module) -> str:
    """SHA-1 over a module's parameter and buffer names, shapes and values."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(labelset: LabelSet, model_hash: str, settings: dict) -> str:
    digest = hashlib.sha1()
    digest.update(str(Path(labelset.root).resolve()).encode())
    digest.update("\n".join(labelset.image_paths).encode())
    digest.update(model_hash.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    """``features.npy`` -> ``features.json``."""
    return Path(path).with_suffix(".json")


def load_features(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a finished feature file (N, C), read-only."""
    path = Path(path)
    if not path.is_file():
        raise MlicError(f"{path}: feature file not found; extract features first")
    return np.load(path, mmap_mode="r", allow_pickle=False)


@torch.no_grad()
def extract_features(
    labelset: LabelSet, model: nn.Module, path: str | os.PathLike, *, img_size: int | None = None,
    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, batch_size: int = 64,
    workers: int = 0, float16: bool = False, device: str | torch.device = "cpu", progress: bool = True,
    decode_size: int | None = None, check: BadImageCheck | None = None,
) -> np.ndarray:
    """Pooled backbone features of every image of ``labelset``, cached at ``path`` (a ``.npy``).

    Args:
        labelset: the images (in row order).
        model: a Classifier (its ``.backbone`` is used; image size and normalisation come from its
            config) or a backbone module.
        path: output ``.npy`` file; ``<path>.partial`` and ``<path>.progress.json`` exist while running.
        img_size: square input size (default: the Classifier's config, else required).
        mean, std: input normalisation (default: the Classifier's config, else ImageNet).
        batch_size: images per forward pass.
        workers: DataLoader worker processes for decoding.
        float16: store float16 (half the disk and memory; pooling still runs in float32).
        device: where the backbone runs.
        progress: show a progress bar.
        decode_size: decode JPEGs at reduced scale down to this size (faster; see ``load_image``).
        check: counts unreadable images (their rows stay zero; :func:`bad_rows` lists them) and stops past
            its limit; a cached array is checked again from its sidecar.

    Returns:
        The features (N, C) as a read-only memory map of ``path``.
    """
    path = Path(path)
    config = getattr(model, "config", None)
    backbone = model.backbone if hasattr(model, "backbone") else model
    img_size = img_size or (config.img_size if config is not None else None)
    if img_size is None:
        raise MlicError("img_size is required when the model is a bare backbone")
    mean = tuple(mean or (config.mean if config is not None else IMAGENET_MEAN))
    std = tuple(std or (config.std if config is not None else IMAGENET_STD))
    dtype = np.float16 if float16 else np.float32
    settings = {"img_size": img_size, "mean": list(mean), "std": list(std), "dtype": np.dtype(dtype).name,
                "format": FEATURES_FORMAT}
    was_training = backbone.training
    backbone.eval()
    backbone.to(device)
    model_hash = model_fingerprint(backbone)
    fingerprint = _fingerprint(labelset, model_hash, settings)
    sidecar = sidecar_path(path)
    partial = path.with_name(path.name + ".partial")
    marker = path.with_name(path.name + ".progress.json")

    if path.is_file() and sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            info = {}
        if info.get("fingerprint") == fingerprint:
            if check is not None:
                check.add([b["error"] for b in info.get("bad_rows", [])])
                check.finish(len(labelset) - check.count)
            return load_features(path)

    num_images = len(labelset)
    dataset = ImageDataset(labelset, build_transform(img_size, train=False), decode_size=decode_size)
    probe = torch.zeros(1, 3, img_size, img_size, device=device)
    dim = int(pooled_features(backbone, probe).shape[1])

    done, bad_rows = 0, []
    state = None
    if partial.is_file() and marker.is_file():
        try:
            state = json.loads(marker.read_text())
        except json.JSONDecodeError:
            state = None
    if state is not None and state.get("fingerprint") == fingerprint and state.get("shape") == [num_images, dim]:
        out = np.lib.format.open_memmap(partial, mode="r+")
        done, bad_rows = int(state["done"]), list(state.get("bad_rows", []))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(num_images, dim))
        _write_marker(marker, fingerprint, num_images, dim, 0, [])

    bar = progress_bar(num_images, f"features {path.name}", enabled=progress and done < num_images, completed=done)
    try:
        if done < num_images:
            loader = make_loader(Subset(dataset, range(done, num_images)), batch_size=batch_size, workers=workers)
            for images, _, indices, bad in loader:
                count = len(indices) + len(bad)
                if len(indices):
                    batch = normalize(images.to(device), mean, std)
                    feats = pooled_features(backbone, batch).cpu().numpy()
                    out[indices.numpy()] = feats.astype(dtype)
                if bad:
                    bad_set = set(indices.tolist())
                    missing = [r for r in range(done, done + count) if r not in bad_set]
                    out[missing] = 0
                    bad_rows += [{"row": r, "error": msg} for r, msg in zip(missing, bad)]
                    if check is not None:
                        check.add(bad)
                done += count
                out.flush()
                _write_marker(marker, fingerprint, num_images, dim, done, bad_rows)
                bar.advance(count=count)
    finally:
        bar.close()
        backbone.train(was_training)
    del out
    if check is not None:
        check.finish(num_images - len(bad_rows))
    os.replace(partial, path)
    info = {"fingerprint": fingerprint, "model": model_hash, "num_images": num_images, "dim": dim,
            "labelset_split": labelset.split, "bad_rows": bad_rows, **settings}
    atomic_write_bytes(sidecar, json.dumps(info, indent=1).encode())
    marker.unlink(missing_ok=True)
    return load_features(path)


def _write_marker(marker: Path, fingerprint: str, num_images: int, dim: int, done: int, bad_rows: list) -> None:
    state = {"fingerprint": fingerprint, "shape": [num_images, dim], "done": done, "bad_rows": bad_rows}
    atomic_write_bytes(marker, json.dumps(state).encode())


def bad_rows(path: str | os.PathLike) -> np.ndarray:
    """Rows of a finished feature cache whose image could not be read (their features are zeros)."""
    info = json.loads(sidecar_path(path).read_text())
    return np.array(sorted(b["row"] for b in info.get("bad_rows", [])), dtype=np.int64)
