"""Multi-label evaluation metrics: average precision and ML-GCN threshold metrics.

Every function takes ``scores`` and ``targets`` as NumPy arrays of shape ``(N, K)`` (N images,
K classes) and is pure: no state, no torch (callers convert with ``.cpu().numpy()``).

Conventions:

* **Targets** use the package-wide encoding 1 = positive, 0 = negative, -1 = unknown. Unknown
  entries are ignored everywhere: they are left out of their class's ranking for AP, and they
  count neither as predictions nor as ground truth in the threshold metrics.
* **Scales.** :func:`average_precision` returns fractions in [0, 1], exactly like
  ``sklearn.metrics.average_precision_score``. Everything meant for a results table
  (:func:`mean_average_precision`, :func:`threshold_metrics`, :func:`metrics_table`, including its
  ``"per_class_ap"``) is in percent.
* **AP modes.** ``mode="sklearn"`` is ``average_precision_score`` applied to each class
  (non-interpolated; tied scores form one threshold, so the result does not depend on how ties
  are ordered). ``mode="voc"`` is the all-point interpolated VOC AP reported by Query2Label
  (precision envelope, i.e. the running maximum from the right); it depends on the order of tied
  scores, which is fixed here as ascending row index (a stable sort on descending score).
* **Classes without a known positive** (every entry 0 or -1) have no defined AP. :func:`average_precision`
  gives them ``NaN`` (``null`` in mlic's JSON) and warns with their number. The rule for the mean is
  chosen where the mean is taken: ``empty="exclude"`` (default) averages over the classes with a known
  positive, and :func:`metrics_table` says how many in ``"mAP_classes"``; ``empty="zero"`` counts the
  others as AP 0, which is what a scikit-learn per-class loop and Cole et al. report. On data where every
  class has a positive the two agree. Both warn, saying which rule was applied.
* **0/0** in the threshold metrics (precision of a class never predicted, recall of a class with
  no positive, an F1 whose precision and recall are both 0) is treated as 0, as ML-GCN does
  for precision.

**Sparse targets** (OpenImages size: 125k images x 9,605 classes, ~1% known) go through the ``known_*``
functions (:func:`known_metrics_table`, :func:`known_average_precision`, :func:`known_best_thresholds`): they
read the known entries class chunk by class chunk (``targets.by_class()``) and gather only their scores, with
the same default rule ``empty="exclude"`` (the OpenImages protocol's).

Everything is vectorised over classes: one sort of the ``(K, N)`` score matrix (a plain integer
sort of packed keys for float32 scores, an argsort for float64), then binary searches over the
positions of the positives; no Python loop per class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np

from mlic.errors import MlicError

APMode = Literal["sklearn", "voc"]
EmptyRule = Literal["zero", "exclude"]

_THRESHOLD_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")


class _Ranking(NamedTuple):
    """Every class's entries sorted by descending score, all arrays of shape ``(K, N)``."""

    image_of: Callable[[np.ndarray], np.ndarray]  # flat positions in the ranking -> image (row) indices
    positive: np.ndarray
    valid: np.ndarray  # target is not -1
    group_end: np.ndarray  # True at the last entry of each run of tied scores


def _validate(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and values; return float scores and int8 targets, both ``(N, K)``."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise MlicError(f"scores and targets must both have shape (N, K); got {scores.shape} and {targets.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise MlicError("scores contain NaN or infinity")
    targets_int = targets.astype(np.int8)
    if not ((targets_int == targets) & (targets_int >= -1) & (targets_int <= 1)).all():
        raise MlicError("targets must contain only 1 (positive), 0 (negative) and -1 (unknown)")
    return scores, targets_int


_INDEX_BITS = 30


def _rank_packed(scores: np.ndarray, targets: np.ndarray) -> _Ranking:
    """Rank float32 (or narrower) scores with a single ``np.sort`` of packed uint64 keys.

    The key is ``descending score bits | row index | target code`` from high to low bits, so one
    sort of plain integers (much faster than an argsort) yields the order, ties broken by row
    index, and the sorted targets without any gather.
    """
    by_class = np.ascontiguousarray(scores.T, dtype=np.float32)
    by_class += np.float32(0.0)  # -0.0 becomes +0.0, which it equals
    bits = by_class.view(np.uint32)
    # Order-reversing map from IEEE bits to uint32: non-negative floats first, larger ones first.
    descending = np.where(bits >= np.uint32(1 << 31), bits, np.uint32(0x7FFFFFFF) - bits)
    keys = descending.astype(np.uint64)
    keys <<= np.uint64(32)
    low = np.ascontiguousarray(targets.T).astype(np.uint32)
    low += np.uint32(1)  # 0 unknown, 1 negative, 2 positive
    low |= np.arange(scores.shape[0], dtype=np.uint32) << np.uint32(2)
    keys |= low
    keys.sort(axis=1)
    group_end = np.ones(keys.shape, dtype=bool)
    high = keys >> np.uint64(32)
    np.not_equal(high[:, :-1], high[:, 1:], out=group_end[:, :-1])
    code = keys & np.uint64(3)

    def image_of(flat: np.ndarray) -> np.ndarray:
        return ((keys.ravel()[flat] >> np.uint64(2)) & np.uint64((1 << _INDEX_BITS) - 1)).astype(np.int64)

    return _Ranking(image_of, code == 2, code != 0, group_end)


def _rank(scores: np.ndarray, targets: np.ndarray, stable: bool) -> _Ranking:
    """Sort each class by descending score.

    Args:
        scores: Validated scores, shape ``(N, K)``.
        targets: Validated int8 targets, shape ``(N, K)``.
        stable: Order tied scores by ascending row index. Only the VOC AP needs this. Scores of
            float32 or narrower always come out stable.

    Returns:
        The ranking, arrays of shape ``(K, N)``.
    """
    n = scores.shape[0]
    if scores.dtype.itemsize <= 4 and n < 1 << _INDEX_BITS:
        return _rank_packed(scores, targets)
    by_class = np.ascontiguousarray(scores.T)
    order = np.argsort(-by_class, axis=1)
    sorted_scores = np.take_along_axis(by_class, order, axis=1)
    group_end = np.ones(sorted_scores.shape, dtype=bool)
    np.not_equal(sorted_scores[:, :-1], sorted_scores[:, 1:], out=group_end[:, :-1])
    if stable and not group_end.all():
        # Tied scores share a group number; sorting (group, row) keys reorders rows inside each
        # group only, which is cheaper than a stable argsort of the floats.
        group = np.cumsum(group_end, axis=1) - group_end
        keys = group * n + order
        keys.sort(axis=1)
        order = keys % n
    sorted_targets = np.take_along_axis(np.ascontiguousarray(targets.T), order, axis=1)
    return _Ranking(lambda flat: order.ravel()[flat], sorted_targets == 1, sorted_targets >= 0, group_end)


class _Positives(NamedTuple):
    """The positives of a ranking, flattened row by row in rank order, all arrays of shape ``(P,)``."""

    at: np.ndarray  # flat position in the (K, N) ranking
    class_index: np.ndarray  # class (row of the ranking) of each positive
    group_end: np.ndarray  # flat position of the end of its run of tied scores
    tp_at_end: np.ndarray  # positives ranked at or above that end
    seen_at_end: np.ndarray  # known entries ranked at or above that end
    count: np.ndarray  # positives per class, shape (K,)


def _count_upto(sorted_flat: np.ndarray, at: np.ndarray, row_start: np.ndarray) -> np.ndarray:
    """How many of ``sorted_flat`` lie in ``[row_start, at]``, for each element of ``at``."""
    return np.searchsorted(sorted_flat, at, side="right") - np.searchsorted(sorted_flat, row_start, side="left")


def _positives(ranking: _Ranking) -> _Positives:
    """Counts at each positive, from flat positions and binary searches instead of (K, N) cumsums."""
    num_classes, n = ranking.positive.shape
    at = np.flatnonzero(ranking.positive)
    class_index = at // n
    row_start = class_index * n
    ends = np.flatnonzero(ranking.group_end)
    # Groups never cross classes: the last entry of every row is a group end.
    group_end = ends[np.searchsorted(ends, at)]
    unknown = np.flatnonzero(~ranking.valid)
    tp_at_end = _count_upto(at, group_end, row_start)
    seen_at_end = group_end - row_start + 1 - _count_upto(unknown, group_end, row_start)
    count = np.bincount(class_index, minlength=num_classes)
    return _Positives(at, class_index, group_end, tp_at_end, seen_at_end, count)


def _reverse_running_max(values: np.ndarray, class_index: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Running maximum from the right within each class, for values sorted by class; shape ``(P,)``."""
    if values.size == 0:
        return values
    first = np.cumsum(count) - count
    column = np.arange(values.size) - first[class_index]
    padded = np.full((count.size, count.max()), -np.inf)
    padded[class_index, column] = values
    return np.maximum.accumulate(padded[:, ::-1], axis=1)[:, ::-1][class_index, column]


def _ap_from_ranking(ranking: _Ranking, mode: APMode) -> np.ndarray:
    """Per-class AP in [0, 1], shape ``(K,)``; NaN where a class has no positive."""
    positives = _positives(ranking)
    if mode == "sklearn":
        # Each positive earns the precision at the end of its run of ties: sklearn's rule of one
        # threshold per distinct score.
        credit = positives.tp_at_end / positives.seen_at_end
    elif mode == "voc":
        # Precision just at each positive, then the envelope. Between two positives precision only
        # falls, so the maximum to the right is always reached at a positive.
        row_start = positives.class_index * ranking.positive.shape[1]
        first = np.cumsum(positives.count) - positives.count
        tp = np.arange(positives.at.size) - first[positives.class_index] + 1
        unknown = np.flatnonzero(~ranking.valid)
        seen = positives.at - row_start + 1 - _count_upto(unknown, positives.at, row_start)
        credit = _reverse_running_max(tp / seen, positives.class_index, positives.count)
    else:
        raise AssertionError(mode)
    total = np.bincount(positives.class_index, weights=credit, minlength=positives.count.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives.count > 0, total / positives.count, np.nan)


def _warn_empty(ap: np.ndarray, consequence: str, stacklevel: int) -> None:
    """Warn about classes without a positive; ``stacklevel`` counts from this function."""
    num_empty = int(np.isnan(ap).sum())
    if num_empty:
        warnings.warn(
            f"{num_empty} of {ap.size} classes have no positive target; {consequence}",
            UserWarning,
            stacklevel=stacklevel,
        )


def _check_options(mode: APMode, empty: EmptyRule = "exclude") -> None:
    if mode not in ("sklearn", "voc"):
        raise MlicError(f"mode must be 'sklearn' or 'voc', got {mode!r}")
    if empty not in ("zero", "exclude"):
        raise MlicError(f"empty must be 'zero' or 'exclude', got {empty!r}")


def _mean_ap(ap: np.ndarray, empty: EmptyRule) -> float:
    """Mean AP in percent; warns on behalf of the public function that called this one."""
    if empty == "zero":
        _warn_empty(ap, "they count as AP 0 in the mean (empty='zero')", stacklevel=4)
        return float(np.nan_to_num(ap, nan=0.0).mean() * 100) if ap.size else float("nan")
    if empty == "exclude":
        _warn_empty(ap, "they are left out of the mean (empty='exclude')", stacklevel=4)
        kept = ap[~np.isnan(ap)]
        return float(kept.mean() * 100) if kept.size else float("nan")
    raise AssertionError(empty)


def _averaged_classes(ap: np.ndarray, empty: EmptyRule) -> int:
    """How many classes a mean under ``empty`` averages: all, or those with a known positive (AP not NaN)."""
    return int(ap.size) if empty == "zero" else int((~np.isnan(ap)).sum())


def average_precision(scores: np.ndarray, targets: np.ndarray, mode: APMode = "sklearn") -> np.ndarray:
    """Average precision of every class.

    Args:
        scores: Scores or probabilities, shape ``(N, K)``; higher means more likely positive.
        targets: 1 / 0 / -1 (positive / negative / unknown), shape ``(N, K)``.
        mode: ``"sklearn"`` (non-interpolated, equal to ``average_precision_score`` per class)
            or ``"voc"`` (all-point interpolated, as Query2Label reports).

    Returns:
        AP in [0, 1], shape ``(K,)``; NaN for classes without a positive target (with a warning).
    """
    _check_options(mode)
    scores, targets = _validate(scores, targets)
    ap = _ap_from_ranking(_rank(scores, targets, stable=mode == "voc"), mode)
    _warn_empty(ap, "their AP is NaN", stacklevel=3)
    return ap


def mean_average_precision(
    scores: np.ndarray, targets: np.ndarray, mode: APMode = "sklearn", empty: EmptyRule = "exclude"
) -> float:
    """Mean of the per-class average precision, in percent.

    Args:
        scores: Scores, shape ``(N, K)``.
        targets: 1 / 0 / -1, shape ``(N, K)``.
        mode: ``"sklearn"`` or ``"voc"``, see :func:`average_precision`.
        empty: What a class without a known positive contributes: ``"exclude"`` (default) leaves it out
            of the mean, ``"zero"`` counts it as AP 0. A warning says how many there were.

    Returns:
        mAP in percent; NaN if ``empty="exclude"`` and no class has a known positive.
    """
    _check_options(mode, empty)
    scores, targets = _validate(scores, targets)
    ap = _ap_from_ranking(_rank(scores, targets, stable=mode == "voc"), mode)
    return _mean_ap(ap, empty)


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """True at each row's ``k`` highest scores, shape ``(N, K)``; ties at the cut go to lower columns."""
    if k < 1:
        raise MlicError(f"top_k must be a positive integer, got {k}")
    num_classes = scores.shape[1]
    if k >= num_classes:
        return np.ones(scores.shape, dtype=bool)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    above = scores > kth
    at_cut = scores == kth
    room = k - above.sum(axis=1, keepdims=True)
    return above | (at_cut & (np.cumsum(at_cut, axis=1) <= room))


def _safe_ratio(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(
        numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape), where=denominator != 0
    )


def _threshold_metrics(
    scores: np.ndarray, targets: np.ndarray, threshold: float | np.ndarray, top_k: int | None
) -> dict[str, float]:
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim > 1 or threshold.size not in (1, scores.shape[1]):
        raise MlicError(f"threshold must be a float or an array of shape ({scores.shape[1]},), got {threshold.shape}")
    predicted = (scores >= threshold) & (targets >= 0)
    if top_k is not None:
        predicted &= _top_k_mask(scores, top_k)
    positive = targets == 1
    return _counts_to_metrics((predicted & positive).sum(axis=0), predicted.sum(axis=0), positive.sum(axis=0))


def _counts_to_metrics(true_pos: np.ndarray, num_predicted: np.ndarray, num_positive: np.ndarray) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 in percent from per-class counts, each ``(K,)``; 0/0 counts as 0."""
    cp = _safe_ratio(true_pos, num_predicted).mean() if true_pos.size else 0.0
    cr = _safe_ratio(true_pos, num_positive).mean() if true_pos.size else 0.0
    op = _safe_ratio(true_pos.sum(), num_predicted.sum())
    o_r = _safe_ratio(true_pos.sum(), num_positive.sum())
    values = (cp, cr, _safe_ratio(2 * cp * cr, cp + cr), op, o_r, _safe_ratio(2 * op * o_r, op + o_r))
    return {key: float(value) * 100 for key, value in zip(_THRESHOLD_KEYS, values)}


def threshold_metrics(
    scores: np.ndarray, targets: np.ndarray, threshold: float | np.ndarray = 0.5, top_k: int | None = None
) -> dict[str, float]:
    """ML-GCN per-class and overall precision, recall and F1, in percent.

    A label is predicted when its score is ``>= threshold``. CP and CR are the means over classes
    of the per-class precision and recall; CF1 is the harmonic mean of CP and CR (not the mean of
    per-class F1s). OP, OR and OF1 pool the counts of all classes. Unknown (-1) entries are
    ignored; 0/0 counts as 0.

    Args:
        scores: Scores, shape ``(N, K)``, on the same scale as ``threshold``.
        targets: 1 / 0 / -1, shape ``(N, K)``.
        threshold: One threshold, or one per class with shape ``(K,)`` (see :func:`best_thresholds`).
        top_k: If set, only each image's ``top_k`` highest scores may be predicted (still requiring
            ``>= threshold``); the top is taken over all K classes, ties at the cut going to the
            lower class index.

    Returns:
        ``{"CP", "CR", "CF1", "OP", "OR", "OF1"}`` as Python floats.
    """
    scores, targets = _validate(scores, targets)
    return _threshold_metrics(scores, targets, threshold, top_k)


def best_thresholds(scores: np.ndarray, targets: np.ndarray, fallback: float = 0.5) -> np.ndarray:
    """Per-class thresholds that maximise each class's F1 on the given data.

    Candidates are the class's distinct scores; predicting ``score >= threshold`` at the returned
    value reaches the best F1. Among equally good thresholds the highest is returned. Each
    threshold is one of the given scores exactly (a float32 0.3 comes back as 0.30000001192...),
    so apply it to scores of the same dtype.

    Args:
        scores: Scores, shape ``(N, K)``.
        targets: 1 / 0 / -1, shape ``(N, K)``; unknown entries are ignored.
        fallback: Threshold for classes without a positive target, whose F1 is 0 whatever the
            threshold.

    Returns:
        Thresholds, shape ``(K,)``, float64, ready for :func:`threshold_metrics`.
    """
    scores, targets = _validate(scores, targets)
    ranking = _rank(scores, targets, stable=False)
    positives = _positives(ranking)
    thresholds = np.full(scores.shape[1], fallback, dtype=np.float64)
    if positives.at.size == 0:
        return thresholds
    # Between two positives F1 = 2 TP / (predicted + positives) only falls, so the best threshold
    # is the score of some positive; predicting its whole run of ties gives the counts at its end.
    f1 = 2 * positives.tp_at_end / (positives.seen_at_end + positives.count[positives.class_index])
    classes = np.flatnonzero(positives.count)
    first = (np.cumsum(positives.count) - positives.count)[classes]
    best_f1 = np.maximum.reduceat(f1, first)
    candidates = np.flatnonzero(f1 == np.repeat(best_f1, positives.count[classes]))
    # The first candidate of each class is the highest score reaching the best F1.
    best = candidates[np.searchsorted(positives.class_index[candidates], classes)]
    images = ranking.image_of(positives.at[best])
    thresholds[classes] = scores[images, classes]
    return thresholds


def metrics_table(
    scores: np.ndarray,
    targets: np.ndarray,
    threshold: float | np.ndarray = 0.5,
    mode: APMode = "sklearn",
    empty: EmptyRule = "exclude",
) -> dict[str, float | np.ndarray]:
    """The whole evaluation table, in percent.

    Args:
        scores: Scores, shape ``(N, K)``.
        targets: 1 / 0 / -1, shape ``(N, K)``.
        threshold: Float or per-class ``(K,)`` threshold for the threshold metrics.
        mode: AP mode behind ``"mAP"`` and ``"per_class_ap"``; ``"mAP_voc"`` is always VOC.
        empty: Rule for classes without a known positive in both means, see :func:`mean_average_precision`.

    Returns:
        ``"mAP"``, ``"mAP_voc"``, ``"mAP_classes"`` (how many classes the means average: those with a
        known positive, or all K with ``empty="zero"``), ``"CP"``, ``"CR"``, ``"CF1"``, ``"OP"``,
        ``"OR"``, ``"OF1"`` and the same six with a ``"_top3"`` suffix (top-3 predictions per image), as
        Python numbers, plus ``"per_class_ap"``: per-class AP in percent, shape ``(K,)``, NaN for
        classes without a known positive.
    """
    _check_options(mode, empty)
    scores, targets = _validate(scores, targets)
    ranking = _rank(scores, targets, stable=True)
    ap = _ap_from_ranking(ranking, mode)
    ap_voc = ap if mode == "voc" else _ap_from_ranking(ranking, "voc")
    table: dict[str, float | np.ndarray] = {"mAP": _mean_ap(ap, empty)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the same classes were just reported
        table["mAP_voc"] = _mean_ap(ap_voc, empty)
    table["mAP_classes"] = _averaged_classes(ap, empty)
    table.update(_threshold_metrics(scores, targets, threshold, None))
    top3 = _threshold_metrics(scores, targets, threshold, 3)
    table.update({f"{key}_top3": value for key, value in top3.items()})
    table["per_class_ap"] = ap * 100
    return table
