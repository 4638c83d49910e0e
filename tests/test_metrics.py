import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlic.metrics import (
    average_precision,
    best_thresholds,
    mean_average_precision,
    metrics_table,
    threshold_metrics,
)

# float32 and narrower take the packed-key sort, float64 the argsort; both must agree with the references.
DTYPES = [np.float16, np.float32, np.float64]


def make_data(seed: int, n: int = 300, k: int = 7, unknown: float = 0.0, decimals: int = 1, dtype=np.float64):
    """Random scores correlated with the targets, rounded so that many scores tie."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < rng.uniform(0.05, 0.5, size=k)).astype(np.int64)
    scores = np.round(rng.random((n, k)) * 0.7 + 0.3 * targets, decimals).astype(dtype)
    if unknown:
        targets[rng.random((n, k)) < unknown] = -1
    return scores, targets


def sklearn_ap(scores, targets):
    """average_precision_score on each class's known rows, shape (K,)."""
    aps = []
    for j in range(scores.shape[1]):
        keep = targets[:, j] != -1
        aps.append(average_precision_score(targets[keep, j], scores[keep, j]))
    return np.array(aps)


def voc_ap_reference(score_column, target_column):
    """Query2Label's voc_mAP for one class, written as a plain loop, on the known rows."""
    keep = target_column != -1
    scores, targets = score_column[keep], target_column[keep]
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros(len(scores))
    fp = np.zeros(len(scores))
    for i, j in enumerate(order):
        tp[i] = targets[j] == 1
        fp[i] = targets[j] == 0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / tp[-1]
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    changed = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changed + 1] - mrec[changed]) * mpre[changed + 1]))


def threshold_reference(scores, targets, threshold, top_k=None):
    """ML-GCN counts with plain loops; -1 ignored, 0/0 = 0, top-k ties to the lower class."""
    n, k = scores.shape
    threshold = np.broadcast_to(np.asarray(threshold, dtype=float), (k,))
    true_pos, predicted, positive = np.zeros(k), np.zeros(k), np.zeros(k)
    for i in range(n):
        allowed = set(np.argsort(-scores[i], kind="stable")[:top_k].tolist()) if top_k else set(range(k))
        for j in range(k):
            if targets[i, j] == -1:
                continue
            is_predicted = scores[i, j] >= threshold[j] and j in allowed
            predicted[j] += is_predicted
            positive[j] += targets[i, j] == 1
            true_pos[j] += is_predicted and targets[i, j] == 1

    def ratio(a, b):
        return a / b if b else 0.0

    cp = np.mean([ratio(t, p) for t, p in zip(true_pos, predicted)])
    cr = np.mean([ratio(t, p) for t, p in zip(true_pos, positive)])
    op, o_r = ratio(true_pos.sum(), predicted.sum()), ratio(true_pos.sum(), positive.sum())
    values = [cp, cr, ratio(2 * cp * cr, cp + cr), op, o_r, ratio(2 * op * o_r, op + o_r)]
    return {key: 100 * v for key, v in zip(["CP", "CR", "CF1", "OP", "OR", "OF1"], values)}


# ---------------------------------------------------------------- average precision


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(5))
def test_sklearn_mode_matches_sklearn_with_ties(seed, dtype):
    scores, targets = make_data(seed, dtype=dtype)
    assert len(np.unique(scores[:, 0])) < 20  # the data really has ties
    np.testing.assert_allclose(average_precision(scores, targets), sklearn_ap(scores, targets), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(5))
def test_sklearn_mode_ignores_unknown_targets(seed, dtype):
    scores, targets = make_data(seed, unknown=0.3, dtype=dtype)
    assert (targets == -1).any()
    np.testing.assert_allclose(average_precision(scores, targets), sklearn_ap(scores, targets), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sklearn_mode_without_ties_and_with_logits(dtype):
    rng = np.random.default_rng(7)
    targets = (rng.random((500, 5)) < 0.3).astype(int)
    scores = (rng.normal(size=(500, 5)) * 3 + targets).astype(dtype)
    scores[:20, 0] = 0.0
    scores[20:40, 0] = -0.0  # equal to +0.0, so one tie group with it
    np.testing.assert_allclose(average_precision(scores, targets), sklearn_ap(scores, targets), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(5))
def test_voc_mode_matches_loop_reference(seed, dtype):
    scores, targets = make_data(seed, unknown=0.2 if seed % 2 else 0.0, dtype=dtype)
    expected = [voc_ap_reference(scores[:, j], targets[:, j]) for j in range(scores.shape[1])]
    np.testing.assert_allclose(average_precision(scores, targets, mode="voc"), expected, rtol=0, atol=1e-12)


def test_voc_differs_from_sklearn_on_ties():
    # One tie group holding a negative before a positive: sklearn scores the group at its end,
    # VOC walks it in row order.
    scores = np.array([[0.9], [0.5], [0.5], [0.1]])
    targets = np.array([[1], [0], [1], [1]])
    assert average_precision(scores, targets)[0] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision(scores, targets, mode="voc")[0] == pytest.approx((1 + 3 / 4 + 3 / 4) / 3)


def test_perfect_and_reversed_ranking():
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.2, 0.2], [0.1, 0.1]])
    np.testing.assert_allclose(average_precision(scores, targets), [1.0, (1 / 3 + 2 / 4) / 2])


def test_empty_class_is_nan_with_warning():
    scores, targets = make_data(0)
    targets[:, [1, 4]] = 0
    targets[::2, 2] = -1
    targets[1::2, 2] = 0
    with pytest.warns(UserWarning, match="3 of 7 classes have no positive target") as record:
        ap = average_precision(scores, targets)
    assert record[0].filename == __file__  # points at the caller
    assert np.isnan(ap[[1, 2, 4]]).all()
    assert not np.isnan(np.delete(ap, [1, 2, 4])).any()


def test_empty_rules_for_the_mean():
    scores, targets = make_data(1)
    targets[:, 3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn also warns about the empty class
        reference = sklearn_ap(scores, targets)
    assert reference[3] == 0  # the sklearn loop counts it as 0 ...
    with pytest.warns(UserWarning, match=r"1 of 7 .*empty='zero'") as record:
        zero = mean_average_precision(scores, targets, empty="zero")
    assert record[0].filename == __file__
    assert zero == pytest.approx(100 * reference.mean(), abs=1e-9)  # ... and so does empty="zero"
    with pytest.warns(UserWarning, match=r"1 of 7 .*empty='exclude'") as record:
        excluded = mean_average_precision(scores, targets)  # the default: the class has no AP to average
    assert record[0].filename == __file__
    assert excluded == pytest.approx(100 * np.delete(reference, 3).mean(), abs=1e-9)
    assert excluded > zero


def test_no_warning_without_empty_classes():
    scores, targets = make_data(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean_average_precision(scores, targets)
        mean_average_precision(scores, targets, mode="voc", empty="exclude")


def test_all_classes_empty_excluded_is_nan():
    with pytest.warns(UserWarning, match="2 of 2"):
        assert np.isnan(mean_average_precision(np.ones((3, 2)), np.zeros((3, 2)), empty="exclude"))


def test_mean_average_precision_is_percent_of_per_class_mean():
    scores, targets = make_data(3, unknown=0.1)
    for mode in ("sklearn", "voc"):
        assert mean_average_precision(scores, targets, mode=mode) == pytest.approx(
            100 * average_precision(scores, targets, mode=mode).mean()
        )


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), "shape"),
        (np.zeros(3), np.zeros(3), "shape"),
        (np.array([[0.1], [np.nan]]), np.array([[1], [0]]), "NaN"),
        (np.array([[0.1], [0.2]]), np.array([[1], [2]]), "targets"),
        (np.array([[0.1], [0.2]]), np.array([[1], [0.5]]), "targets"),
    ],
)
def test_invalid_inputs(scores, targets, message):
    with pytest.raises(ValueError, match=message):
        average_precision(scores, targets)


def test_invalid_options():
    scores, targets = make_data(0)
    with pytest.raises(ValueError, match="mode"):
        average_precision(scores, targets, mode="coco")
    with pytest.raises(ValueError, match="empty"):
        mean_average_precision(scores, targets, empty="drop")
    with pytest.raises(ValueError, match="threshold"):
        threshold_metrics(scores, targets, threshold=np.full(3, 0.5))
    with pytest.raises(ValueError, match="top_k"):
        threshold_metrics(scores, targets, top_k=0)


# ---------------------------------------------------------------- threshold metrics

TINY_SCORES = np.array(
    [
        [0.9, 0.2, 0.6, 0.1],
        [0.4, 0.7, 0.5, 0.2],
        [0.8, 0.1, 0.3, 0.3],
        [0.3, 0.6, 0.2, 0.4],
    ]
)
TINY_TARGETS = np.array(
    [
        [1, 0, 1, 0],
        [0, 1, -1, 0],
        [1, 0, 0, 1],
        [0, 0, 0, 0],
    ]
)


def table_in_percent(cp, cr, op, o_r):
    return {
        "CP": 100 * cp,
        "CR": 100 * cr,
        "CF1": 200 * cp * cr / (cp + cr),
        "OP": 100 * op,
        "OR": 100 * o_r,
        "OF1": 200 * op * o_r / (op + o_r),
    }


def test_threshold_metrics_by_hand():
    # At 0.5 -- class 0: TP 2, predicted 2, positives 2; class 1: 1, 2, 1; class 2: 1, 1, 1 (the
    # 0.5 on row 1 is unknown, so not counted); class 3: 0, 0, 1 (precision 0/0 = 0).
    expected = table_in_percent(cp=(1 + 1 / 2 + 1 + 0) / 4, cr=(1 + 1 + 1 + 0) / 4, op=4 / 5, o_r=4 / 5)
    assert threshold_metrics(TINY_SCORES, TINY_TARGETS) == pytest.approx(expected)
    assert expected["OF1"] == pytest.approx(80.0)


def test_threshold_metrics_top1_by_hand():
    # Top-1 keeps classes 0, 1, 0, 1 on the four rows: class 2 loses its only prediction.
    expected = table_in_percent(cp=(1 + 1 / 2 + 0 + 0) / 4, cr=(1 + 1 + 0 + 0) / 4, op=3 / 4, o_r=3 / 5)
    assert threshold_metrics(TINY_SCORES, TINY_TARGETS, top_k=1) == pytest.approx(expected)


def test_threshold_is_inclusive_and_nothing_predicted_is_zero():
    scores = np.array([[0.5, 0.4]])
    targets = np.array([[1, 1]])
    assert threshold_metrics(scores, targets)["CR"] == pytest.approx(50.0)
    nothing = threshold_metrics(scores, targets, threshold=0.9)
    assert nothing == {key: 0.0 for key in nothing}


def test_class_without_positives_has_recall_zero():
    # Class 1 has no positive: its recall 0/0 counts as 0 in CR, its precision is 0/1.
    got = threshold_metrics(np.array([[0.9, 0.9]]), np.array([[1, 0]]))
    assert got == pytest.approx(table_in_percent(cp=1 / 2, cr=1 / 2, op=1 / 2, o_r=1))


def test_top_k_ties_go_to_lower_class():
    scores = np.array([[0.7, 0.7, 0.7, 0.2]])
    assert threshold_metrics(scores, np.array([[0, 0, 1, 0]]), top_k=2)["OP"] == 0.0
    assert threshold_metrics(scores, np.array([[0, 1, 0, 0]]), top_k=2)["OP"] == 50.0


@pytest.mark.parametrize("seed", range(4))
def test_threshold_metrics_match_loop_reference(seed):
    scores, targets = make_data(seed, n=120, k=9, unknown=0.15)
    per_class = np.random.default_rng(seed).uniform(0.2, 0.8, size=9)
    for threshold in (0.5, per_class):
        for top_k in (None, 3):
            got = threshold_metrics(scores, targets, threshold=threshold, top_k=top_k)
            assert got == pytest.approx(threshold_reference(scores, targets, threshold, top_k), abs=1e-10)


# ---------------------------------------------------------------- best thresholds


def f1_at(score_column, target_column, threshold):
    keep = target_column != -1
    predicted = score_column[keep] >= threshold
    positive = target_column[keep] == 1
    tp = (predicted & positive).sum()
    return 2 * tp / (predicted.sum() + positive.sum()) if tp else 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_best_thresholds_maximise_f1(seed, dtype):
    scores, targets = make_data(seed, n=150, unknown=0.2 if seed % 2 else 0.0, decimals=2, dtype=dtype)
    targets[:, 5] = np.minimum(targets[:, 5], 0)  # one class without positives
    thresholds = best_thresholds(scores, targets, fallback=0.25)
    assert thresholds.shape == (scores.shape[1],) and thresholds.dtype == np.float64
    for j in range(scores.shape[1]):
        if j == 5:
            assert thresholds[j] == 0.25
            continue
        candidates = np.unique(scores[targets[:, j] != -1, j])
        f1 = np.array([f1_at(scores[:, j], targets[:, j], c) for c in candidates])
        assert f1_at(scores[:, j], targets[:, j], thresholds[j]) == pytest.approx(f1.max(), abs=1e-12)
        assert thresholds[j] == candidates[np.flatnonzero(f1 >= f1.max() - 1e-12).max()]  # highest of the best


def test_best_thresholds_prefers_the_highest_of_equal_f1():
    # F1 is 2/3 both at 0.9 (TP 1 of 1 predicted) and at 0.6 (TP 2 of 4 predicted).
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.1]])
    targets = np.array([[1], [0], [0], [1], [0]])
    assert best_thresholds(scores, targets)[0] == 0.9


def test_best_thresholds_feed_threshold_metrics():
    scores, targets = make_data(3, n=200, k=6, decimals=2)
    tuned = threshold_metrics(scores, targets, threshold=best_thresholds(scores, targets))
    assert tuned["CF1"] >= threshold_metrics(scores, targets)["CF1"]


# ---------------------------------------------------------------- table


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metrics_table_agrees_with_the_parts(dtype):
    scores, targets = make_data(4, n=200, k=8, unknown=0.1, dtype=dtype)
    table = metrics_table(scores, targets, threshold=0.6)
    assert table["mAP"] == pytest.approx(mean_average_precision(scores, targets))
    assert table["mAP_voc"] == pytest.approx(mean_average_precision(scores, targets, mode="voc"))
    assert {key: table[key] for key in ("CP", "CR", "CF1", "OP", "OR", "OF1")} == pytest.approx(
        threshold_metrics(scores, targets, threshold=0.6)
    )
    top3 = threshold_metrics(scores, targets, threshold=0.6, top_k=3)
    assert {key: table[f"{key}_top3"] for key in top3} == pytest.approx(top3)
    np.testing.assert_allclose(table["per_class_ap"], 100 * average_precision(scores, targets))
    assert table["mAP_classes"] == 8 and type(table["mAP_classes"]) is int
    floats = {key: value for key, value in table.items() if key not in ("per_class_ap", "mAP_classes")}
    assert len(floats) == 14 and all(type(value) is float for value in floats.values())
    json.dumps(floats)


def test_metrics_table_warns_once_for_empty_classes():
    scores, targets = make_data(5)
    targets[:, 0] = 0
    with pytest.warns(UserWarning) as record:
        table = metrics_table(scores, targets, mode="voc", empty="exclude")
    assert len(record) == 1 and "1 of 7" in str(record[0].message) and record[0].filename == __file__
    assert np.isnan(table["per_class_ap"][0])
    assert table["mAP"] == table["mAP_voc"] == pytest.approx(np.nanmean(table["per_class_ap"]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_class_whose_labels_are_all_unknown_has_no_ap_and_is_not_averaged(dtype):
    scores, targets = make_data(6, unknown=0.2, dtype=dtype)
    targets[:, 2] = -1  # nothing known: no positive to rank
    targets[:, 5] = np.where(targets[:, 5] == 1, -1, targets[:, 5])  # known negatives only
    with pytest.warns(UserWarning, match=r"2 of 7 .*empty='exclude'"):
        table = metrics_table(scores, targets)
    assert np.isnan(table["per_class_ap"][[2, 5]]).all() and table["mAP_classes"] == 5
    others = [j for j in range(7) if j not in (2, 5)]
    assert table["mAP"] == pytest.approx(100 * sklearn_ap(scores[:, others], targets[:, others]).mean(), abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert mean_average_precision(scores, targets) == pytest.approx(table["mAP"], abs=1e-12)
        zero = metrics_table(scores, targets, empty="zero")  # the rule that counts them as 0, on request
    assert zero["mAP_classes"] == 7 and zero["mAP"] == pytest.approx(table["mAP"] * 5 / 7)
