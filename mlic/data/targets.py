"""Target matrices: int8 (N, K), 1 = positive, 0 = negative, -1 = unknown, stored dense or sparse.

A dense matrix is an ``np.ndarray``. A :class:`SparseTargets` stores only the known entries of each
row (CSR: row pointers, class ids, values; memory-mapped when loaded) and reads like the dense matrix:
``targets[i]`` is a dense int8 row (K,), ``targets[rows]`` a dense (m, K) block, ``np.asarray``
the whole matrix, ``.shape`` / ``len`` as usual. OpenImages (9M images x 9,605 classes, ~8 known
labels each) is 86 GB dense and ~0.4 GB sparse. On disk a sparse matrix ``<name>`` is
``<name>.indptr.npy`` int64 (N+1), ``<name>.indices.npy`` int32 (nnz), ``<name>.values.npy`` int8 (nnz).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from mlic.errors import MlicError
from mlic.io import atomic_npy_memmap

SPARSE_ABOVE_BYTES = 256 << 20
"""``save(storage="auto")`` stores a matrix sparsely above this dense size (when sparse is at most half)."""
MAX_DENSE_BYTES = 4 << 30
"""Densifying a :class:`SparseTargets` larger than this (``np.asarray``) is refused with a clear error."""
SPARSE_PARTS = ("indptr", "indices", "values")
"""The arrays of a sparse matrix, one ``<name>.<part>.npy`` file each."""

Storage = Literal["auto", "dense", "sparse"]


class LabelSetError(MlicError):
    """A LabelSet or its target matrix is malformed; the message names the file or field and the fix.

    Defined with the target storage, which :mod:`mlic.data.labelset` builds on, and imported from there.
    """


class SparseTargets:
    """An int8 (N, K) target matrix that stores only its known entries, row by row (CSR).

    Every entry not stored is -1 (unknown). Reads like a dense matrix where mlic reads targets:
    ``t[i]`` is a dense int8 row (K,), ``t[rows]`` / ``t[a:b]`` a dense (m, K) block, ``np.asarray(t)``
    the whole matrix (refused above :data:`MAX_DENSE_BYTES`), ``t == v`` / ``t != v`` dense boolean
    matrices; ``shape``, ``ndim``, ``dtype``, ``len`` as for an array. Column access for metrics is
    :meth:`by_class`.

    Args:
        indptr: int64 (N+1,): row i's entries are ``indices[indptr[i]:indptr[i+1]]``.
        indices: int32 (nnz,): class ids, ascending and distinct within a row.
        values: int8 (nnz,): 1 positive or 0 negative.
        num_classes: K.
    """

    ndim = 2
    dtype = np.dtype(np.int8)
    __hash__ = None  # mutable-array semantics, like np.ndarray

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, num_classes: int) -> None:
        self.indptr = np.asanyarray(indptr)
        self.indices = np.asanyarray(indices)
        self.values = np.asanyarray(values)
        self.num_classes = int(num_classes)
        for part, kind in (("indptr", np.int64), ("indices", np.int32), ("values", np.int8)):
            array = getattr(self, part)
            if array.ndim != 1 or array.dtype != kind:
                raise LabelSetError(f"sparse {part} must be 1-D {np.dtype(kind)}, got {array.dtype} {array.shape}")
        if self.indptr.size == 0 or self.indptr[0] != 0 or self.indptr[-1] != self.indices.size:
            raise LabelSetError(f"sparse indptr must start at 0 and end at nnz={self.indices.size}")
        if self.values.size != self.indices.size:
            raise LabelSetError(f"sparse values hold {self.values.size} entries, indices {self.indices.size}")
        if self.indices.size:
            # min/max scans are cheap even for 70M memory-mapped entries; per-row order is the writer's job
            if self.indices.min() < 0 or self.indices.max() >= self.num_classes:
                raise LabelSetError(f"sparse class ids must lie in [0, {self.num_classes})")
            if self.values.min() < 0 or self.values.max() > 1:
                raise LabelSetError("sparse values may hold only 1 (positive) and 0 (negative); unknown is implicit")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indptr.size - 1, self.num_classes)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nnz(self) -> int:
        """Number of known entries."""
        return int(self.indices.size)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SparseTargets(shape={self.shape}, known={self.nnz})"

    def rows(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """Dense int8 (m, K) block of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        rows = rows % max(len(self), 1)
        out = np.full((rows.size, self.num_classes), -1, dtype=np.int8)
        start, stop = self.indptr[rows], self.indptr[rows + 1]
        counts = stop - start
        if counts.sum():
            owner = np.repeat(np.arange(rows.size), counts)
            flat = np.repeat(start - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            out[owner, self.indices[flat]] = self.values[flat]
        return out

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            block = np.full(self.num_classes, -1, dtype=np.int8)
            lo, hi = self.indptr[i], self.indptr[i + 1]
            block[self.indices[lo:hi]] = self.values[lo:hi]
        elif isinstance(key, slice):
            block = self.rows(np.arange(len(self))[key])
        else:
            key = np.asarray(key)
            block = self.rows(np.flatnonzero(key) if key.dtype == bool else key)
        return block[(slice(None),) + rest] if rest and block.ndim == 2 else (block[rest] if rest else block)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self.size > MAX_DENSE_BYTES:
            raise LabelSetError(f"densifying {self.shape} sparse targets would take {self.size / 2**30:.1f} GiB; "
                                f"read rows (targets[i]) or columns (by_class) instead")
        dense = np.full(self.shape, -1, dtype=np.int8)
        for start in range(0, len(self), 1 << 16):
            stop = min(start + (1 << 16), len(self))
            lo, hi = self.indptr[start], self.indptr[stop]
            owner = np.repeat(np.arange(start, stop), np.diff(self.indptr[start:stop + 1]))
            dense[owner, self.indices[lo:hi]] = self.values[lo:hi]
        return dense if dtype is None else dense.astype(dtype, copy=False)

    def __eq__(self, other):
        return np.asarray(self) == other

    def __ne__(self, other):
        return np.asarray(self) != other

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        """The dense matrix as ``dtype`` (as ``np.ndarray.astype``)."""
        return np.asarray(self, dtype=dtype)

    def take(self, rows: np.ndarray | list[int]) -> SparseTargets:
        """Rows ``rows`` as a new in-memory SparseTargets."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        start, stop = self.indptr[rows], self.indptr[rows + 1]
        counts = stop - start
        indptr = np.zeros(rows.size + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        flat = np.repeat(start - indptr[:-1], counts) + np.arange(indptr[-1])
        return SparseTargets(indptr, np.array(self.indices[flat]), np.array(self.values[flat]), self.num_classes)

    def by_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The known entries column by column (CSC).

        Returns:
            (class_ptr int64 (K+1,), rows int64 (nnz,), values int8 (nnz,)): class c's known entries are
            rows ``rows[class_ptr[c]:class_ptr[c+1]]`` (ascending) with values ``values[...]``.
        """
        order = np.argsort(self.indices, kind="stable")
        rows = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))[order]
        class_ptr = np.zeros(self.num_classes + 1, np.int64)
        np.cumsum(np.bincount(self.indices, minlength=self.num_classes), out=class_ptr[1:])
        return class_ptr, rows, np.asarray(self.values)[order]

    def count(self, value: int) -> np.ndarray:
        """Entries equal to ``value`` (1, 0 or -1) per row, int64 (N,)."""
        if value == -1:
            return self.num_classes - np.diff(self.indptr)
        row_of = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        return np.bincount(row_of[np.asarray(self.values) == value], minlength=len(self)).astype(np.int64)

    @classmethod
    def from_dense(cls, dense: np.ndarray, chunk_rows: int = 1 << 16) -> SparseTargets:
        """The known entries of a dense (N, K) matrix (read ``chunk_rows`` rows at a time)."""
        dense = np.asanyarray(dense)
        n, k = dense.shape
        counts, indices, values = [], [np.zeros(0, np.int32)], [np.zeros(0, np.int8)]
        for start in range(0, n, chunk_rows):
            block = np.asarray(dense[start:start + chunk_rows])
            row, col = np.nonzero(block != -1)
            counts.append(np.bincount(row, minlength=block.shape[0]))
            indices.append(col.astype(np.int32))
            values.append(block[row, col].astype(np.int8))
        indptr = np.zeros(n + 1, np.int64)
        if n:
            np.cumsum(np.concatenate(counts), out=indptr[1:])
        return cls(indptr, np.concatenate(indices), np.concatenate(values), k)

    def save(self, directory: Path, name: str) -> None:
        """Write ``<name>.indptr/indices/values.npy`` atomically, each streamed in chunks."""
        for part in SPARSE_PARTS:
            source = getattr(self, part)
            with atomic_npy_memmap(directory / f"{name}.{part}.npy", source.dtype, source.shape) as out:
                for start in range(0, source.size, 1 << 24):
                    out[start:start + (1 << 24)] = source[start:start + (1 << 24)]

    @classmethod
    def load(cls, directory: Path, name: str, num_classes: int, mmap: bool = True) -> SparseTargets:
        """Read what :meth:`save` wrote, memory-mapped unless ``mmap`` is False."""
        parts = [np.load(directory / f"{name}.{part}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                 for part in SPARSE_PARTS]
        return cls(*parts, num_classes)


def is_sparse(targets) -> bool:
    """Whether a target matrix is a :class:`SparseTargets` (CSR, never densified) rather than a dense (N, K) array."""
    return isinstance(targets, SparseTargets)


def check_targets(targets: np.ndarray | SparseTargets, name: str = "targets") -> np.ndarray | SparseTargets:
    """Validate a target matrix and return it as int8 (a :class:`SparseTargets` is validated when built).

    Args:
        targets: (N, K) array with values in {1, 0, -1}, or SparseTargets.
        name: what to call the array in error messages.
    """
    if is_sparse(targets):
        return targets
    targets = np.asanyarray(targets)
    if targets.ndim != 2:
        raise LabelSetError(f"{name} must be a 2-D (images x classes) matrix, got shape {targets.shape}")
    if targets.size and not np.isin(targets, (-1, 0, 1)).all():
        bad = np.unique(targets[~np.isin(targets, (-1, 0, 1))])[:5]
        raise LabelSetError(f"{name} may hold only 1 (positive), 0 (negative), -1 (unknown); found {bad.tolist()}")
    return targets.astype(np.int8, copy=False)


def take_rows(matrix: np.ndarray | SparseTargets, rows: np.ndarray) -> np.ndarray | SparseTargets:
    """Rows of a target matrix, copied into memory in the same storage."""
    return matrix.take(rows) if is_sparse(matrix) else np.array(matrix[rows])


def store_sparse(matrix: np.ndarray | SparseTargets, storage: Storage) -> bool:
    """Whether ``storage`` stores ``matrix`` sparsely; "auto": above :data:`SPARSE_ABOVE_BYTES` dense, when the
    sparse files take at most half of that."""
    if storage != "auto":
        return storage == "sparse"
    n, k = matrix.shape
    if n * k <= SPARSE_ABOVE_BYTES:
        return False
    if is_sparse(matrix):
        known = matrix.nnz
    else:
        known = sum(int((np.asarray(matrix[s:s + (1 << 16)]) != -1).sum()) for s in range(0, n, 1 << 16))
    return 8 * (n + 1) + 5 * known <= n * k // 2
