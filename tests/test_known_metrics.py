"""Metrics over known entries only (mlic.known_metrics): equal to mlic.metrics and scikit-learn on data that fits,
without densifying sparse targets."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlic.known_metrics import (
    known_average_precision,
    known_best_thresholds,
    known_mean_average_precision,
    known_metrics_table,
)
from mlic.metrics import average_precision, best_thresholds, mean_average_precision, metrics_table


def partial_problem(n=300, k=23, known=0.15, seed=5, dtype=np.float32):
    rng = np.random.RandomState(seed)
    truth = (rng.rand(n, k) < 0.3).astype(np.int8)
    targets = np.where(rng.rand(n, k) < known, truth, -1).astype(np.int8)
    scores = np.round(rng.rand(n, k) + 0.4 * truth, 1).astype(dtype)  # rounded: many ties
    targets[:, 0] = -1  # no known entry at all
    targets[:, 1] = np.where(targets[:, 1] == -1, -1, 0)  # known negatives only
    return scores, targets


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunk_entries", [1, 1000, 1 << 22])  # one class per chunk, a few, all at once
def test_known_average_precision_matches_sklearn_on_known_entries(dtype, sparse, chunk_entries):
    from mlic.data.targets import SparseTargets

    scores, targets = partial_problem(dtype=dtype)
    given = SparseTargets.from_dense(targets) if sparse else targets
    with pytest.warns(UserWarning, match="2 of 23 classes have no positive"):
        ap = known_average_precision(scores, given, chunk_entries=chunk_entries)
    assert np.isnan(ap[:2]).all()
    for c in range(2, targets.shape[1]):
        known = targets[:, c] != -1
        assert ap[c] == pytest.approx(average_precision_score(targets[known, c], scores[known, c]), abs=1e-12), c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        np.testing.assert_allclose(ap, average_precision(scores, targets), atol=1e-12)


def test_known_mean_average_precision_reads_memory_mapped_scores(tmp_path):

    scores, targets = partial_problem()
    np.save(tmp_path / "scores.npy", scores)
    mapped = np.load(tmp_path / "scores.npy", mmap_mode="r")
    with pytest.warns(UserWarning, match="left out of the mean"):
        value = known_mean_average_precision(mapped, targets, chunk_entries=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert value == pytest.approx(mean_average_precision(scores, targets, empty="exclude"), abs=1e-10)


def test_known_average_precision_rejects_bad_input():

    scores, targets = partial_problem()
    with pytest.raises(ValueError, match="shape"):
        known_average_precision(scores[:, :3], targets)
    scores[5, 7] = np.nan
    targets[5, 7] = 1
    with pytest.raises(ValueError, match="NaN"):
        known_average_precision(scores, targets)
    targets[5, 7] = 3
    with pytest.raises(ValueError, match="only 1"):
        known_average_precision(scores, targets)


# ---- the whole table over known entries (sparse targets) ------------------------------------------------------


class NeverDense:
    """SparseTargets that fail the test when anything densifies them (whole matrix, rows or comparisons)."""

    def __init__(self, targets):
        from mlic.data.targets import SparseTargets

        self.sparse = SparseTargets.from_dense(targets)
        self.shape, self.ndim = self.sparse.shape, 2

    def by_class(self):
        return self.sparse.by_class()

    def take(self, rows):
        return self.sparse.take(rows)

    def __getattr__(self, name):  # __array__, rows, __getitem__, astype, __eq__ ... all densify
        raise AssertionError(f"known_metrics_table densified the targets through {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("storage", ["dense", "sparse"])
@pytest.mark.parametrize("chunk_entries", [1, 700, 1 << 22])  # one class / a few rows per chunk, all at once
@pytest.mark.parametrize("empty", ["exclude", "zero"])
def test_known_metrics_table_equals_metrics_table_on_dense_targets_with_unknowns(dtype, storage, chunk_entries,
                                                                                empty):

    scores, targets = partial_problem(n=200, k=13, known=0.3, dtype=dtype)
    threshold = np.linspace(0.3, 0.9, 13)
    given = NeverDense(targets) if storage == "sparse" else targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = metrics_table(scores, targets, threshold=threshold, empty=empty)
        table = known_metrics_table(scores, given, threshold=threshold, empty=empty, chunk_entries=chunk_entries)
    assert set(table) == set(expected)  # mAP_classes included: the two paths give the same table
    for key, value in expected.items():
        np.testing.assert_allclose(table[key], value, atol=1e-10, err_msg=key)
    assert table["mAP_classes"] == (13 if empty == "zero" else 11)  # classes 0 and 1 have no known positive
    assert np.isnan(table["per_class_ap"][:2]).all()
    reference = [average_precision_score(targets[targets[:, j] != -1, j], scores[targets[:, j] != -1, j])
                 for j in range(2, targets.shape[1])]
    np.testing.assert_allclose(table["per_class_ap"][2:] / 100, reference, atol=1e-12)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_known_metrics_table_reads_only_rows_from_memory_mapped_scores(storage, tmp_path):

    scores, targets = partial_problem(n=240, k=9, known=0.4)
    rows = np.sort(np.random.RandomState(0).choice(240, 150, replace=False))
    unread = np.setdiff1d(np.arange(240), rows)
    scores[unread] = np.nan  # unreadable images: their scores must never be used
    np.save(tmp_path / "scores.npy", scores)
    mapped = np.load(tmp_path / "scores.npy", mmap_mode="r")
    given = NeverDense(targets) if storage == "sparse" else targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = metrics_table(scores[rows], targets[rows], empty="exclude")
        table = known_metrics_table(mapped, given, rows=rows[::-1], chunk_entries=100)  # any order: a set of rows
        without_top3 = known_metrics_table(mapped, given, rows=rows, top3=False, empty="exclude")
    for key, value in expected.items():
        np.testing.assert_allclose(table[key], value, atol=1e-10, err_msg=key)
    assert not any(key.endswith("_top3") for key in without_top3)
    assert without_top3["mAP"] == pytest.approx(expected["mAP"], abs=1e-10)


def test_known_metrics_table_warns_and_refuses_bad_input():
    from mlic.data.targets import SparseTargets

    scores, targets = partial_problem(n=60, k=5)
    sparse = SparseTargets.from_dense(targets)
    with pytest.warns(UserWarning, match="of 5 classes have no positive target; they are left out") as record:
        table = known_metrics_table(scores, sparse)
    assert f"{5 - table['mAP_classes']} of 5" in str(record[0].message)
    with pytest.raises(ValueError, match="threshold must be"):
        known_metrics_table(scores, sparse, threshold=np.full(4, 0.5))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 60\)"):
        known_metrics_table(scores, sparse, rows=[0, 60])
    with pytest.raises(ValueError, match="shape"):
        known_metrics_table(scores[:, :4], sparse)
    row, col = np.argwhere(targets != -1)[0]
    scores[row, col] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        known_metrics_table(scores, sparse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk_entries", [1, 1 << 22])
def test_known_best_thresholds_equal_best_thresholds(dtype, chunk_entries):

    scores, targets = partial_problem(n=200, k=13, known=0.3, dtype=dtype)
    rows = np.arange(0, 200, 3)
    np.testing.assert_array_equal(
        known_best_thresholds(scores, NeverDense(targets), fallback=0.25, rows=rows, chunk_entries=chunk_entries),
        best_thresholds(scores[rows], targets[rows], fallback=0.25))
    np.testing.assert_array_equal(known_best_thresholds(scores, targets), best_thresholds(scores, targets))


def test_sparse_defaults_are_the_dense_defaults():
    from mlic.data.targets import SparseTargets

    scores, targets = partial_problem(n=120, k=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dense = metrics_table(scores, targets)  # no rule given: a class without a known positive is left out
        sparse = known_metrics_table(scores, SparseTargets.from_dense(targets))
        assert known_mean_average_precision(scores, targets) == pytest.approx(mean_average_precision(scores, targets))
    assert sparse["mAP_classes"] == dense["mAP_classes"] == 7 and np.isnan(sparse["per_class_ap"][:2]).all()
    for key, value in dense.items():
        np.testing.assert_allclose(sparse[key], value, atol=1e-10, err_msg=key)
