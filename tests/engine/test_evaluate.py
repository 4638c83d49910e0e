"""``evaluate_scores`` / ``fit_thresholds``: the dense path, and sparse targets scored without densifying."""

import json
import warnings

import numpy as np
import pytest

from mlic.data.targets import SparseTargets
from mlic.engine.evaluate import DivergedError, evaluate_scores, fit_thresholds
from mlic.engine.report import finite_or_none, metrics_json, metrics_jsonl, write_metrics_json
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
        dense = evaluate_scores(scores, targets, threshold=0.6, rows=rows)  # the dense path: the same rule
    for key, value in expected.items():
        np.testing.assert_allclose(table[key], value, atol=1e-10, err_msg=key)
        np.testing.assert_allclose(dense[key], value, atol=1e-10, err_msg=key)
    assert table["mAP_classes"] == dense["mAP_classes"] == 7 and np.isnan(table["per_class_ap"][0])
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


@pytest.mark.parametrize("sparse", [False, True])
def test_a_class_without_a_known_positive_has_no_ap_and_is_left_out_of_the_map(sparse):
    scores, targets = problem()
    targets[:, 3] = -1  # every label of class 3 unknown
    given = SparseTargets.from_dense(targets) if sparse else targets
    with pytest.warns(UserWarning, match="2 of 8 classes have no positive target; they are left out"):
        table = evaluate_scores(scores, given)
    ap = table["per_class_ap"]
    assert np.isnan(ap[[0, 3]]).all() and not np.isnan(np.delete(ap, [0, 3])).any()
    assert table["mAP_classes"] == 6
    assert table["mAP"] == pytest.approx(np.nanmean(table["per_class_ap"]), abs=1e-10)  # not a 0 for classes 0 and 3


@pytest.mark.parametrize("sparse", [False, True])
def test_where_every_class_has_a_positive_the_map_is_the_mean_over_all_classes(sparse):
    # validation and test figures on such data (the MultiDigits demo) are the same under either rule
    scores, targets = problem(seed=3)
    targets[0] = 1
    given = SparseTargets.from_dense(targets) if sparse else targets
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing to warn about
        table = evaluate_scores(scores, given)
    zero = metrics_table(scores, targets, empty="zero")
    assert table["mAP_classes"] == 8
    for key in ("mAP", "mAP_voc", "CF1", "OF1"):
        assert table[key] == pytest.approx(zero[key], abs=1e-10)


def strict_loads(text: str):
    """``json.loads`` as a strict parser: NaN, Infinity and -Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_strict_loads_refuses_what_json_dumps_writes_for_nan():
    with pytest.raises(ValueError, match="not JSON: NaN"):
        strict_loads(json.dumps({"mAP": float("nan")}))


def test_metrics_json_writes_null_for_every_non_finite_number():
    record = {"mAP": float("nan"), "up": float("inf"), "down": -np.inf, "ok": np.float32(1.5), "count": np.int64(3),
              "flag": np.bool_(True), "per_class": np.array([0.5, np.nan]), "nested": [{"x": (np.float64("nan"), 2)}],
              np.int64(7): np.float16("inf"), "text": "nan"}
    text = metrics_json(record, indent=1)
    assert strict_loads(text) == {"mAP": None, "up": None, "down": None, "ok": 1.5, "count": 3, "flag": True,
                                  "per_class": [0.5, None], "nested": [{"x": [None, 2]}], "7": None, "text": "nan"}
    assert finite_or_none(np.float32("nan")) is None and type(finite_or_none(np.int32(2))) is int
    lines = metrics_jsonl([{"epoch": 1, "val_mAP": float("nan")}, {"epoch": 2, "val_mAP": 50.0}])
    assert [strict_loads(line) for line in lines.splitlines()] == [{"epoch": 1, "val_mAP": None},
                                                                    {"epoch": 2, "val_mAP": 50.0}]


@pytest.mark.parametrize("sparse", [False, True])
def test_a_metrics_file_is_strict_json_with_null_for_a_class_without_ap(sparse, tmp_path):
    scores, targets = problem()
    targets[:, 1:] = -1  # only class 0 has labels, and none is positive: no class has an AP, no mAP either
    given = SparseTargets.from_dense(targets) if sparse else targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table = evaluate_scores(scores, given)
    table["unreadable_images"] = 0
    classes = [f"c{j}" for j in range(8)]
    write_metrics_json(tmp_path / "m.json", table, classes)
    written = strict_loads((tmp_path / "m.json").read_text())
    assert written["mAP"] is None and written["mAP_voc"] is None and written["mAP_classes"] == 0
    assert written["per_class_ap"] == dict.fromkeys(classes) and written["unreadable_images"] == 0
    assert written["CP"] == 0.0
