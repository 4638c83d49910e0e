"""Import and export Cole et al.'s "formatted" label files (elijahcole/single-positive-multi-label).

Their preprocessing writes, per split ("train" = official train set, "val" = official val set)::

    formatted_{split}_labels.npy      (N, K) float, clean labels 1 / 0
    formatted_{split}_images.npy      (N,) str, image paths relative to the data set folder
    formatted_{split}_labels_obs.npy  (N, K) float, observed labels: +1 positive, 0 unobserved, -1 negative

mlic's encoding is 1 positive, 0 negative, -1 unknown, so the observed matrix is converted here,
and only here: their 0 → our -1, their -1 → our 0, 1 → 1. NumPy files are read without pickle;
an image list saved as a Python-object array must be re-saved as a string array.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlic.data.labelset import LabelSet
from mlic.errors import MlicError
from mlic.io import atomic_save_npy
from mlic.registry import register_reader


def formatted_paths(directory: str | os.PathLike, split: str) -> dict[str, Path]:
    """The three file paths of a split: keys "labels", "images", "labels_obs"."""
    directory = Path(directory)
    return {key: directory / f"formatted_{split}_{key}.npy" for key in ("labels", "images", "labels_obs")}


def _load(path: Path, field: str) -> np.ndarray:
    if not path.is_file():
        raise MlicError(f"{path}: file not found (field '{field}')")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise MlicError(f"{path}: field '{field}' holds Python objects; re-save it as a plain NumPy array "
                             "(np.save(path, np.asarray(x, dtype=str)))") from None
        raise MlicError(f"{path}: field '{field}' is not a readable .npy file ({e})") from None
    except OSError as e:
        raise MlicError(f"{path}: field '{field}' cannot be read ({e})") from None


def _check_values(array: np.ndarray, allowed: tuple[int, ...], path: Path, field: str) -> None:
    if array.ndim != 2:
        raise MlicError(f"{path}: field '{field}' must be a 2-D (images x classes) matrix, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise MlicError(f"{path}: field '{field}' must be numeric, got dtype {array.dtype}")
    bad = ~np.isin(array, allowed)
    if bad.any():
        found = np.unique(array[bad])[:5].tolist()
        raise MlicError(f"{path}: field '{field}' may hold only {list(allowed)}, found {found}")


def import_formatted(directory: str | os.PathLike, split: str, root: str | os.PathLike = ".",
                     classes: list[str] | None = None, observed: bool | None = None) -> LabelSet:
    """Read one split of Cole et al.'s formatted files as a LabelSet.

    Args:
        directory: folder holding ``formatted_{split}_*.npy``.
        split: "train" or "val" (their names; any name works).
        root: folder the image paths are relative to (their COCO layout: the data/coco folder).
        classes: K class names (default "0" … "K-1"; their files store none — for COCO, the order
            of ``categories`` in instances_train2014.json).
        observed: read ``_labels_obs.npy`` (True), skip it (False), or read it if present (None).

    Returns:
        LabelSet with int8 ``targets`` (clean) and, when read, ``observed`` in mlic's encoding.

    Raises:
        ValueError: a file is missing or malformed; the message names the file and the field.
    """
    paths = formatted_paths(directory, split)
    labels = _load(paths["labels"], "labels")
    _check_values(labels, (0, 1), paths["labels"], "labels")
    images = _load(paths["images"], "images")
    if images.ndim != 1 or images.dtype.kind not in "US":
        raise MlicError(f"{paths['images']}: field 'images' must be a 1-D array of path strings, got "
                         f"shape {images.shape} dtype {images.dtype}")
    if len(images) != len(labels):
        raise MlicError(f"{paths['images']}: field 'images' has {len(images)} paths but {paths['labels'].name} has "
                         f"{len(labels)} rows")
    obs = None
    if observed or (observed is None and paths["labels_obs"].is_file()):
        theirs = _load(paths["labels_obs"], "labels_obs")
        _check_values(theirs, (-1, 0, 1), paths["labels_obs"], "labels_obs")
        if theirs.shape != labels.shape:
            raise MlicError(f"{paths['labels_obs']}: field 'labels_obs' has shape {theirs.shape}, labels "
                             f"{labels.shape}")
        obs = np.where(theirs == 0, -1, np.where(theirs == -1, 0, 1)).astype(np.int8)
    num_classes = labels.shape[1]
    if classes is None:
        classes = [str(j) for j in range(num_classes)]
    elif len(classes) != num_classes:
        raise MlicError(f"{paths['labels']}: field 'labels' has {num_classes} columns but {len(classes)} class "
                         "names were given")
    paths_str = [str(p.decode() if isinstance(p, bytes) else p) for p in images.tolist()]
    return LabelSet(classes=list(classes), image_paths=paths_str, targets=labels.astype(np.int8), root=str(root),
                    split=split, observed=obs, meta={"source": "cole2021_formatted"})


@register_reader("cole")
def prepare_cole(root: Path, images: str | None = None, classes: list[str] | None = None) -> dict[str, LabelSet]:
    """Cole et al.'s formatted_{train,val}_*.npy files; their val (the official val set) is our test."""
    image_root = images or root
    return {"train": import_formatted(root, "train", image_root, classes),
            "test": import_formatted(root, "val", image_root, classes, observed=False)}


def export_formatted(labelset: LabelSet, directory: str | os.PathLike, split: str) -> dict[str, Path]:
    """Write a LabelSet as Cole et al.'s formatted files (float64 matrices, string image paths).

    The clean targets must be fully known (1 / 0). Observed labels, when present, are written to
    ``_labels_obs.npy`` in their encoding (our -1 → 0, our 0 → -1). Files are written atomically.

    Returns:
        The paths written.
    """
    if (labelset.targets == -1).any():
        raise MlicError(f"labelset '{labelset.split}': field 'targets' has unknown (-1) entries; Cole et al.'s "
                         "labels file holds full 1/0 labels only (put partial labels in 'observed')")
    paths = formatted_paths(directory, split)
    atomic_save_npy(paths["labels"], np.asarray(labelset.targets, dtype=np.float64))
    atomic_save_npy(paths["images"], np.asarray(labelset.image_paths, dtype=str))
    written = {"labels": paths["labels"], "images": paths["images"]}
    if labelset.observed is not None:
        ours = np.asarray(labelset.observed)
        theirs = np.where(ours == -1, 0.0, np.where(ours == 0, -1.0, 1.0))
        atomic_save_npy(paths["labels_obs"], theirs)
        written["labels_obs"] = paths["labels_obs"]
    return written
