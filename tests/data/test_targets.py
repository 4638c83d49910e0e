"""Target storage: SparseTargets (CSR) reads like the dense matrix, validates its arrays, refuses to densify huge."""

import numpy as np
import pytest

from mlic.data.labelset import LabelSetError
from mlic.data.targets import SparseTargets


def random_targets(n=40, k=7, known=0.3, seed=1):
    rng = np.random.RandomState(seed)
    values = rng.randint(0, 2, size=(n, k)).astype(np.int8)
    return np.where(rng.rand(n, k) < known, values, -1).astype(np.int8)


def test_sparse_reads_like_dense():
    dense = random_targets()
    dense[3] = -1  # a row with nothing known
    sparse = SparseTargets.from_dense(dense, chunk_rows=6)
    assert sparse.shape == dense.shape and len(sparse) == 40 and sparse.ndim == 2 and sparse.dtype == np.int8
    assert sparse.nnz == int((dense != -1).sum())
    for i in (0, 3, 39, -1):
        np.testing.assert_array_equal(sparse[i], dense[i])
    rows = np.array([5, 0, 5, 39])
    np.testing.assert_array_equal(sparse[rows], dense[rows])
    np.testing.assert_array_equal(sparse[2:30:3], dense[2:30:3])
    np.testing.assert_array_equal(sparse[dense[:, 0] == 1], dense[dense[:, 0] == 1])
    np.testing.assert_array_equal(sparse[:, 4], dense[:, 4])
    assert sparse[7, 2] == dense[7, 2]
    np.testing.assert_array_equal(np.asarray(sparse), dense)
    np.testing.assert_array_equal(sparse != -1, dense != -1)
    np.testing.assert_array_equal(sparse.count(1), (dense == 1).sum(1))
    np.testing.assert_array_equal(sparse.count(-1), (dense == -1).sum(1))
    np.testing.assert_array_equal(np.asarray(sparse.take(rows)), dense[rows])
    class_ptr, col_rows, values = sparse.by_class()
    for c in range(7):
        known = np.flatnonzero(dense[:, c] != -1)
        np.testing.assert_array_equal(col_rows[class_ptr[c]:class_ptr[c + 1]], known)
        np.testing.assert_array_equal(values[class_ptr[c]:class_ptr[c + 1]], dense[known, c])
    with pytest.raises(IndexError):
        sparse[40]


@pytest.mark.parametrize(
    "parts, message",
    [
        ((np.array([0, 2], np.int64), np.array([0, 9], np.int32), np.array([1, 0], np.int8)), "class ids"),
        ((np.array([0, 1], np.int64), np.array([0], np.int32), np.array([-1], np.int8)), "only 1"),
        ((np.array([0, 3], np.int64), np.array([0], np.int32), np.array([1], np.int8)), "end at nnz"),
        ((np.array([0, 1], np.int32), np.array([0], np.int32), np.array([1], np.int8)), "indptr must be 1-D int64"),
    ],
)
def test_sparse_validation(parts, message):
    with pytest.raises(LabelSetError, match=message):
        SparseTargets(*parts, num_classes=3)


def test_densifying_a_huge_sparse_matrix_is_refused():
    huge = SparseTargets(np.zeros(1_000_001, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int8), 9605)
    assert huge[123].shape == (9605,) and (huge[123] == -1).all()
    with pytest.raises(LabelSetError, match="read rows"):
        np.asarray(huge)
