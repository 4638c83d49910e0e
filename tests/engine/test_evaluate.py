"""``evaluate_scores`` / ``fit_thresholds``: the dense path, and sparse targets scored without densifying."""

import warnings

import numpy as np
import pytest

from mlic.data.labelset import SparseTargets
from mlic.engine.evaluate import DivergedError, evaluate_scores, fit_thresholds
from mlic.metrics import best_thresholds, metrics_table


def problem(n=160, k=8, seed=0):
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, k)) < 0.3).astype(np.int8)
    targets = np.where(rng.random((n, k)) < 0.35, truth, -1).astype(np.int8)
    scores = (rng.random((n, k)) * 0.7 + 0.3 * truth).astype(np.float32)
    targets[:, 0] = np.where(targets[:, 0] == 1, 0, targets[:, 0])  # a class with known negatives only
    return scores, targets


class Refusing(SparseTargets):
    """Sparse targets that may be read only column-wise or as CSR rows, never as a dense matrix or block."""

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("densified")

    def rows(self, rows):
        raise AssertionError("densified rows")


def test_sparse_targets_with_rows_give_the_dense_table_over_known_entries():
    scores, targets = problem()
    rows = np.sort(np.random.default_rng(1).choice(len(scores), 120, replace=False))
    scores[np.setdiff1d(np.arange(len(scores)), rows)] = np.nan  # unreadable images
    sparse = SparseTargets.from_dense(targets)
    sparse = Refusing(sparse.indptr, sparse.indices, sparse.values, sparse.num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table = evaluate_scores(scores, sparse, threshold=0.6, rows=rows)
        expected = metrics_table(scores[rows], targets[rows], threshold=0.6, empty="exclude")
        dense = evaluate_scores(scores, targets, threshold=0.6, rows=rows)  # the dense path: unchanged rule
    for key, value in expected.items():
        np.testing.assert_allclose(table[key], value, atol=1e-10, err_msg=key)
    assert table["mAP_classes"] == 7 and np.isnan(table["per_class_ap"][0])
    assert "mAP_classes" not in dense and dense["mAP"] == pytest.approx(table["mAP"] * 7 / 8)
    np.testing.assert_array_equal(fit_thresholds(scores, sparse, rows), best_thresholds(scores[rows], targets[rows]))
    np.testing.assert_array_equal(fit_thresholds(scores, targets, rows), best_thresholds(scores[rows], targets[rows]))


@pytest.mark.parametrize("sparse", [False, True])
def test_a_non_finite_score_of_a_used_row_means_divergence(sparse):
    scores, targets = problem()
    rows = np.arange(1, len(scores))
    scores[0] = np.nan  # not a used row
    scores[5, 3] = np.inf  # a used row, and whatever its target (a score of an unknown entry counts too)
    targets[5, 3] = -1
    given = SparseTargets.from_dense(targets) if sparse else targets
    with pytest.raises(DivergedError, match=f"not finite for 1 of {len(rows)} images: training diverged"):
        evaluate_scores(scores, given, rows=rows)
    scores[5, 3] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert np.isfinite(evaluate_scores(scores, given, rows=rows)["mAP"])
