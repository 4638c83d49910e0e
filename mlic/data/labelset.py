"""LabelSet: the one canonical form of a labelled image collection.

A LabelSet holds class names, image paths relative to a root folder, and an int8 target
matrix (N, K) with 1 = positive, 0 = negative, -1 = unknown (not observed). Every reader
produces one, every trainer consumes one.

The matrix is either a dense ``np.ndarray`` or a :class:`~mlic.data.targets.SparseTargets` (only the
known entries of each row, memory-mapped CSR; see :mod:`mlic.data.targets`).

On disk a LabelSet is a directory::

    labelset.json   {"classes": [...], "image_paths": [...], "root": "...", "split": "...", "format": 1,
                     "sparse": [names of the matrices stored sparsely]}
    image_paths.npy instead of the JSON list above :data:`PATHS_IN_NPY_ABOVE` images: UTF-8 bytes (N,),
                    read as an :class:`ImagePaths` sequence (9M Python strings would take ~0.8 GB)
    targets.npy     int8 (N, K)                      — dense storage, or sparse storage:
    targets.indptr.npy int64 (N+1), targets.indices.npy int32 (nnz), targets.values.npy int8 (nnz)
    observed.npy    optional int8 (N, K): the observed (partial) labels used for training
                    (or observed.indptr/indices/values.npy)

``save`` picks the storage per matrix (``storage="auto"``): sparse when the dense matrix would take
more than :data:`~mlic.data.targets.SPARSE_ABOVE_BYTES` (256 MiB) and the sparse form less than half of it; COCO-,
VOC-, NUS-WIDE-size data therefore stays dense. ``load`` memory-maps every npy file, so a few
hundred thousand images (or 9M sparse rows) cost nothing until read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlic.data.targets import (
    SPARSE_PARTS,
    LabelSetError,
    SparseTargets,
    Storage,
    check_targets,
    is_sparse,
    store_sparse,
    take_rows,
)
from mlic.errors import MlicError
from mlic.io import atomic_save_npy, atomic_write_bytes

FORMAT_VERSION = 1
PATHS_IN_NPY_ABOVE = 200_000
"""``save`` stores the image paths in ``image_paths.npy`` (memory-mapped on load) above this many images."""


class LabelSetContentError(LabelSetError):
    """A class name or image path a LabelSet cannot hold, refused where no file is known (the constructor);
    whoever read the file (``LabelSet.load``, ``prepare``) names it in front of the message."""


def class_name_problem(name) -> str | None:
    """Why ``name`` cannot be a class name (it must be a non-empty string on one line), or None."""
    if not isinstance(name, str):
        return f"is not a string ({type(name).__name__})"
    if not name.strip():
        return "is empty"
    if not name.isprintable():
        return "holds a line break or another control character"
    return None


def check_class_names(classes, source: str | None = None) -> list[str]:
    """The K class names as plain ``str``, refused unless each is a non-empty one-line string and all differ.

    Every table mlic writes (CSV predictions, reports, per-class columns) has one field per class, which a
    line break, an empty or a repeated name would break.

    Args:
        classes: the names, in column order.
        source: the file they come from, named first in the message; None raises
            :class:`LabelSetContentError` for the caller that knows the file.

    Raises:
        LabelSetError: one line naming the file, the class and the fix.
    """
    error, prefix = (LabelSetError, f"{source}: ") if source is not None else (LabelSetContentError, "")
    names = list(classes)
    first: dict[str, int] = {}
    for j, name in enumerate(names):
        problem = class_name_problem(name)
        if problem is not None:
            raise error(f"{prefix}class {j} ({name!r}) {problem}; class names must be non-empty strings on one line")
        if name in first:
            raise error(f"{prefix}class {name!r} appears twice (classes {first[name]} and {j}); give each class "
                        "its own name")
        first[name] = j
    return [str(name) for name in names]


def image_path_problem(name) -> str | None:
    """Why ``name`` cannot be an image path of a LabelSet ("absolute", "a '..' component", ...), or None.

    Image paths are relative to the LabelSet's root and must stay inside it, judged on the text alone (as
    written, ``\\`` counting as a separator): not empty, not absolute (``/x``, ``\\x``, ``C:x``), no ``..``
    component. Symbolic links inside the root are followed as they are: a data set may link its image folder
    elsewhere, and judging links would mean a stat per image.
    """
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty"
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (name[1:2] == ":" and name[0].isascii()):  # a drive, as C:x
        return "absolute"
    if ".." in posix.split("/"):
        return "a '..' component"
    return None


def _escaping_rows(encoded: np.ndarray) -> np.ndarray:
    """Rows of an ``S`` bytes array (N,) that :func:`image_path_problem` refuses, read 1M at a time."""
    bad = []
    for start in range(0, encoded.shape[0], 1 << 20):
        block = np.asarray(encoded[start:start + (1 << 20)])
        posix = np.strings.replace(block, b"\\", b"/")
        refused = (np.strings.str_len(block) == 0) | np.strings.startswith(posix, b"/") \
            | (np.strings.find(block, b":") == 1) | (posix == b"..") | np.strings.startswith(posix, b"../") \
            | np.strings.endswith(posix, b"/..") | (np.strings.find(posix, b"/../") >= 0)
        bad.append(np.flatnonzero(refused) + start)
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def check_image_paths(paths, source, error: type[LabelSetError] = LabelSetError) -> None:
    """Refuse image paths that leave the image root (the rule of :func:`image_path_problem`).

    Args:
        paths: a list of str or an :class:`ImagePaths` (checked vectorised, ~1 s per 10M paths).
        source: the file (or folder) the paths come from, named first in the message.
        error: the error class to raise.

    Raises:
        ``error``: one line naming ``source``, the first refused row and its path.
    """
    if isinstance(paths, ImagePaths):
        rows = _escaping_rows(paths.encoded)
        first = int(rows[0]) if rows.size else None
    else:
        first = next((i for i, name in enumerate(paths) if image_path_problem(name) is not None), None)
    if first is not None:
        name = paths[first]
        raise error(f"{source}: row {first}: image path {name!r} leaves the image folder ({image_path_problem(name)}); "
                    "image paths must be relative paths inside it")


class ImagePaths(Sequence):
    """N image paths held as one UTF-8 bytes array (N,), e.g. memory-mapped; reads like a list of str.

    Args:
        encoded: 1-D ``np.bytes_`` array (dtype ``S``), one path per entry.
    """

    def __init__(self, encoded: np.ndarray) -> None:
        encoded = np.asanyarray(encoded)
        if encoded.ndim != 1 or encoded.dtype.kind != "S":
            raise LabelSetError(f"image paths must be a 1-D bytes array, got {encoded.dtype} {encoded.shape}")
        self.encoded = encoded

    @classmethod
    def from_strings(cls, paths) -> ImagePaths:
        return cls(np.array([str(p).encode() for p in paths], dtype=np.bytes_))

    def __len__(self) -> int:
        return self.encoded.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [p.decode() for p in self.encoded[i].tolist()]
        return bytes(self.encoded[i]).decode()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), 1 << 16):
            yield from (p.decode() for p in self.encoded[start:start + (1 << 16)].tolist())

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, ImagePaths)) and len(other) == len(self) and \
            all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"ImagePaths({len(self)} paths)"

    def take(self, rows: np.ndarray) -> ImagePaths:
        """Paths ``rows`` as a new in-memory ImagePaths."""
        return ImagePaths(np.array(self.encoded[np.asarray(rows, dtype=np.int64)]))


def cole_split(num_images: int, val_fraction: float = 0.2, seed: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """Cole et al.'s train/validation split of the official train set.

    ``n_val = round(val_fraction · N)``; ``perm = np.random.RandomState(seed).permutation(N)``;
    train = sorted ``perm[:N - n_val]``, validation = sorted ``perm[-n_val:]`` (COCO: 82,081 →
    65,665 / 16,416). Their later subsampling step (fraction 1.0) changes nothing and is omitted.

    Returns:
        (train rows, validation rows), sorted int64 arrays.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MlicError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(np.round(val_fraction * num_images))
    perm = np.random.RandomState(seed).permutation(num_images)
    train = np.sort(perm[: num_images - n_val])
    val = np.sort(perm[num_images - n_val:])
    return train.astype(np.int64), val.astype(np.int64)


@dataclass
class LabelSet:
    """Images with multi-label targets.

    Attributes:
        classes: K class names: distinct, non-empty strings on one line (:func:`check_class_names`,
            refused by the constructor).
        image_paths: N paths relative to ``root`` (POSIX separators): a list of str, or an
            :class:`ImagePaths` (compact, what ``load`` gives above :data:`PATHS_IN_NPY_ABOVE` images).
            ``save`` (and ``load``, for paths in the header) refuses a path that leaves ``root``
            (:func:`image_path_problem`); an unsaved LabelSet may hold any path (``mlic predict``'s inputs).
        targets: int8 (N, K): 1 positive, 0 negative, -1 unknown. The clean labels when known.
            A dense ndarray or a :class:`SparseTargets` (same reading API).
        root: folder the image paths are relative to.
        split: name of the split ("train", "val", "test", ...).
        observed: optional int8 (N, K) observed labels (e.g. single positive), same encoding;
            training uses these when present, evaluation always uses ``targets``.
    """

    classes: list[str]
    image_paths: list[str] | ImagePaths
    targets: np.ndarray | SparseTargets
    root: str = "."
    split: str = ""
    observed: np.ndarray | SparseTargets | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = check_class_names(self.classes)
        if not isinstance(self.image_paths, ImagePaths):
            self.image_paths = [str(p) for p in self.image_paths]
        self.targets = check_targets(self.targets)
        n, k = self.targets.shape
        if len(self.classes) != k:
            raise LabelSetError(f"{len(self.classes)} class names but targets have {k} columns")
        if len(self.image_paths) != n:
            raise LabelSetError(f"{len(self.image_paths)} image paths but targets have {n} rows")
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
    def sparse(self) -> bool:
        """Whether ``targets`` is stored sparsely."""
        return is_sparse(self.targets)

    def label_stats(self) -> dict[str, float]:
        """Positives per image and the percentage of known entries, without densifying sparse targets."""
        n, k = self.targets.shape
        if is_sparse(self.targets):
            positives, known = int(self.targets.count(1).sum()), self.targets.nnz
        else:
            positives, known = 0, 0
            for start in range(0, n, 1 << 16):
                block = np.asarray(self.targets[start:start + (1 << 16)])
                positives += int((block == 1).sum())
                known += int((block != -1).sum())
        return {"positives_per_image": positives / n if n else float("nan"),
                "known_percent": 100 * known / (n * k) if n * k else float("nan")}

    @property
    def train_targets(self) -> np.ndarray | SparseTargets:
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
            image_paths=self.image_paths.take(idx) if isinstance(self.image_paths, ImagePaths)
            else [self.image_paths[i] for i in idx],
            targets=take_rows(self.targets, idx),
            root=self.root,
            split=self.split if split is None else split,
            observed=None if self.observed is None else take_rows(self.observed, idx),
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

    def save(self, directory: str | os.PathLike, storage: Storage = "auto") -> Path:
        """Write the LabelSet to ``directory`` atomically, file by file; returns the directory.

        Args:
            directory: the LabelSet folder.
            storage: "dense", "sparse", or "auto" (sparse when the dense matrix would exceed
                :data:`~mlic.data.targets.SPARSE_ABOVE_BYTES` and the sparse files take at most half of it).
        """
        if storage not in ("auto", "dense", "sparse"):
            raise MlicError(f"storage must be 'auto', 'dense' or 'sparse', got {storage!r}")
        directory = Path(directory)
        check_image_paths(self.image_paths, f"{directory}: image_paths")
        directory.mkdir(parents=True, exist_ok=True)
        sparse = []
        for name, matrix in (("targets", self.targets), ("observed", self.observed)):
            if matrix is None:
                continue
            if store_sparse(matrix, storage):
                if not is_sparse(matrix):
                    matrix = SparseTargets.from_dense(matrix)
                matrix.save(directory, name)
                sparse.append(name)
            else:
                atomic_save_npy(directory / f"{name}.npy", np.asarray(matrix))
        paths_file = directory / "image_paths.npy"
        if len(self.image_paths) > PATHS_IN_NPY_ABOVE:
            paths = self.image_paths if isinstance(self.image_paths, ImagePaths) else \
                ImagePaths.from_strings(self.image_paths)
            atomic_save_npy(paths_file, paths.encoded)
            paths = paths_file.name
        else:
            paths = list(self.image_paths)
        root = os.path.relpath(Path(self.root).resolve(), directory.resolve())
        header = {
            "format": FORMAT_VERSION,
            "classes": self.classes,
            "image_paths": paths,
            "root": root,
            "split": self.split,
            "meta": self.meta,
            "sparse": sparse,
        }
        atomic_write_bytes(directory / "labelset.json", json.dumps(header).encode())
        # the header now names the files in use; files of the other storage (or a dropped observed) are stale
        for name in ("targets", "observed"):
            in_use = None if name == "observed" and self.observed is None else name in sparse
            for stale in ([f"{name}.npy"] if in_use is not False else []) + \
                         ([f"{name}.{part}.npy" for part in SPARSE_PARTS] if in_use is not True else []):
                (directory / stale).unlink(missing_ok=True)
        if not isinstance(paths, str):
            paths_file.unlink(missing_ok=True)
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
        sparse = header.get("sparse", [])
        k = len(header["classes"])
        try:
            if "targets" in sparse:
                targets = SparseTargets.load(directory, "targets", k, mmap)
            else:
                targets = np.load(directory / "targets.npy", mmap_mode=mode, allow_pickle=False)
            if "observed" in sparse:
                observed = SparseTargets.load(directory, "observed", k, mmap)
            else:
                obs_path = directory / "observed.npy"
                observed = np.load(obs_path, mmap_mode=mode, allow_pickle=False) if obs_path.exists() else None
            paths = header["image_paths"]
            if isinstance(paths, str):  # large sets: a bytes array beside the header
                paths = ImagePaths(np.load(directory / paths, mmap_mode=mode, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise LabelSetError(f"{directory}: cannot read the target matrix ({e}); prepare the data again") from None
        root = header.get("root", ".")
        root = str((directory / root).resolve()) if not os.path.isabs(root) else root
        if isinstance(paths, list):  # a hand-edited header; the npy form was checked when saved
            check_image_paths(paths, f"{header_path}: field 'image_paths'")
        try:
            return cls(
                classes=header["classes"],
                image_paths=paths,
                targets=targets,
                root=root,
                split=header.get("split", ""),
                observed=observed,
                meta=header.get("meta", {}),
            )
        except LabelSetContentError as e:
            raise LabelSetError(f"{header_path}: {e}") from None
        except LabelSetError as e:
            raise LabelSetError(f"{directory}: {e}") from None
