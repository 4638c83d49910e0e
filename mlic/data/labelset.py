"""LabelSet: the one canonical form of a labelled image collection.

A LabelSet holds class names, image paths relative to a root folder, and an int8 target
matrix (N, K) with 1 = positive, 0 = negative, -1 = unknown (not observed). Every reader
produces one, every trainer consumes one.

On disk a LabelSet is a directory::

    labelset.json   {"classes": [...], "image_paths": [...], "root": "...", "split": "...", "format": 1}
    targets.npy     int8 (N, K)
    observed.npy    optional int8 (N, K): the observed (partial) labels used for training

``load`` memory-maps the npy files, so a few hundred thousand images cost nothing until read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlic.io import atomic_save_npy, atomic_write_bytes  # noqa: F401  (re-exported for the readers)

FORMAT_VERSION = 1


class LabelSetError(ValueError):
    """A LabelSet is malformed; the message names the file or field and the fix."""


def check_targets(targets: np.ndarray, name: str = "targets") -> np.ndarray:
    """Validate a target matrix and return it as int8.

    Args:
        targets: (N, K) array with values in {1, 0, -1}.
        name: what to call the array in error messages.
    """
    targets = np.asanyarray(targets)
    if targets.ndim != 2:
        raise LabelSetError(f"{name} must be a 2-D (images x classes) matrix, got shape {targets.shape}")
    if targets.size and not np.isin(targets, (-1, 0, 1)).all():
        bad = np.unique(targets[~np.isin(targets, (-1, 0, 1))])[:5]
        raise LabelSetError(f"{name} may hold only 1 (positive), 0 (negative), -1 (unknown); found {bad.tolist()}")
    return targets.astype(np.int8, copy=False)


def cole_split(num_images: int, val_fraction: float = 0.2, seed: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """Cole et al.'s train/validation split of the official train set.

    ``n_val = round(val_fraction · N)``; ``perm = np.random.RandomState(seed).permutation(N)``;
    train = sorted ``perm[:N - n_val]``, validation = sorted ``perm[-n_val:]`` (COCO: 82,081 →
    65,665 / 16,416). Their later subsampling step (fraction 1.0) changes nothing and is omitted.

    Returns:
        (train rows, validation rows), sorted int64 arrays.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(np.round(val_fraction * num_images))
    perm = np.random.RandomState(seed).permutation(num_images)
    train = np.sort(perm[: num_images - n_val])
    val = np.sort(perm[num_images - n_val:])
    return train.astype(np.int64), val.astype(np.int64)


@dataclass
class LabelSet:
    """Images with multi-label targets.

    Attributes:
        classes: K class names, unique.
        image_paths: N paths relative to ``root`` (POSIX separators).
        targets: int8 (N, K): 1 positive, 0 negative, -1 unknown. The clean labels when known.
        root: folder the image paths are relative to.
        split: name of the split ("train", "val", "test", ...).
        observed: optional int8 (N, K) observed labels (e.g. single positive), same encoding;
            training uses these when present, evaluation always uses ``targets``.
    """

    classes: list[str]
    image_paths: list[str]
    targets: np.ndarray
    root: str = "."
    split: str = ""
    observed: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = [str(c) for c in self.classes]
        self.image_paths = [str(p) for p in self.image_paths]
        self.targets = check_targets(self.targets)
        n, k = self.targets.shape
        if len(self.classes) != k:
            raise LabelSetError(f"{len(self.classes)} class names but targets have {k} columns")
        if len(self.image_paths) != n:
            raise LabelSetError(f"{len(self.image_paths)} image paths but targets have {n} rows")
        seen: set[str] = set()
        dupes = [c for c in self.classes if c in seen or seen.add(c)]
        if dupes:
            raise LabelSetError(f"duplicate class names: {sorted(set(dupes))[:5]}")
        if self.observed is not None:
            self.observed = check_targets(self.observed, "observed")
            if self.observed.shape != self.targets.shape:
                raise LabelSetError(f"observed has shape {self.observed.shape}, targets {self.targets.shape}")

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_targets(self) -> np.ndarray:
        """The labels a trainer sees: ``observed`` when present, else ``targets``."""
        return self.observed if self.observed is not None else self.targets

    def path(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return Path(self.root) / self.image_paths[i]

    def subset(self, indices: np.ndarray | list[int], split: str | None = None) -> LabelSet:
        """Rows ``indices`` as a new LabelSet (arrays copied into memory)."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabelSet(
            classes=list(self.classes),
            image_paths=[self.image_paths[i] for i in idx],
            targets=np.array(self.targets[idx]),
            root=self.root,
            split=self.split if split is None else split,
            observed=None if self.observed is None else np.array(self.observed[idx]),
            meta=dict(self.meta),
        )

    def hold_out(self, fraction: float, seed: int = 1200) -> tuple[LabelSet, LabelSet]:
        """Split off ``round(fraction * N)`` rows as validation, as Cole et al. do.

        ``RandomState(seed).permutation(N)``: the last n indices (sorted) are validation, the others
        (sorted) stay train. Observed labels travel with their rows. Returns (train, val).
        """
        train, val = cole_split(len(self), fraction, seed)
        if len(val) == 0 or len(train) == 0:
            raise LabelSetError(f"holding out {fraction} of {len(self)} images leaves an empty split")
        return self.subset(train, split="train"), self.subset(val, split="val")

    def with_observed(self, observed: np.ndarray | None) -> LabelSet:
        """A copy whose observed labels are ``observed``."""
        return LabelSet(self.classes, self.image_paths, self.targets, self.root, self.split, observed, dict(self.meta))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the LabelSet to ``directory`` atomically, file by file; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(directory / "targets.npy", self.targets)
        if self.observed is not None:
            atomic_save_npy(directory / "observed.npy", self.observed)
        elif (directory / "observed.npy").exists():
            (directory / "observed.npy").unlink()
        root = os.path.relpath(Path(self.root).resolve(), directory.resolve())
        header = {
            "format": FORMAT_VERSION,
            "classes": self.classes,
            "image_paths": self.image_paths,
            "root": root,
            "split": self.split,
            "meta": self.meta,
        }
        atomic_write_bytes(directory / "labelset.json", json.dumps(header).encode())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> LabelSet:
        """Read a LabelSet written by :meth:`save`.

        ``root`` is stored relative to the directory, so a prepared folder can move with its images.
        """
        directory = Path(directory)
        header_path = directory / "labelset.json"
        if not header_path.is_file():
            raise LabelSetError(f"{header_path}: not found; prepare the data first "
                                f"(mlic prepare ... --out {directory})")
        try:
            header = json.loads(header_path.read_text())
        except json.JSONDecodeError as e:
            raise LabelSetError(f"{header_path}: not valid JSON ({e}); prepare the data again") from None
        for key in ("classes", "image_paths"):
            if key not in header:
                raise LabelSetError(f"{header_path}: missing field '{key}'; prepare the data again")
        mode = "r" if mmap else None
        try:
            targets = np.load(directory / "targets.npy", mmap_mode=mode, allow_pickle=False)
            obs_path = directory / "observed.npy"
            observed = np.load(obs_path, mmap_mode=mode, allow_pickle=False) if obs_path.exists() else None
        except (OSError, ValueError) as e:
            raise LabelSetError(f"{directory}: cannot read the target matrix ({e}); prepare the data again") from None
        root = header.get("root", ".")
        root = str((directory / root).resolve()) if not os.path.isabs(root) else root
        try:
            return cls(
                classes=header["classes"],
                image_paths=header["image_paths"],
                targets=targets,
                root=root,
                split=header.get("split", ""),
                observed=observed,
                meta=header.get("meta", {}),
            )
        except LabelSetError as e:
            raise LabelSetError(f"{directory}: {e}") from None
