"""Metrics over the known entries only (the OpenImages protocol), for sparse targets at that size.

Each class's entries whose target is not -1 are gathered class chunk by class chunk (``by_class()`` of a
:class:`mlic.data.targets.SparseTargets`, or the known cells of a dense matrix), sorted once per chunk, and
reduced to AP (scikit-learn and VOC), F1-best thresholds and threshold counts. The target matrix is never
densified and the score matrix (an ndarray or a memmap, 125k × 9,605 on OpenImages) is never copied: only the
scores at known entries are read, plus, for the top-3 metrics, one chunk of rows at a time. Results equal
:mod:`mlic.metrics` on data that fits (tested), with the same rule for classes without a known positive (AP
NaN, left out of the mean by default, ``"mAP_classes"`` counting the classes averaged).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from mlic.errors import MlicError
from mlic.metrics import (
    APMode,
    EmptyRule,
    _averaged_classes,
    _check_options,
    _counts_to_metrics,
    _mean_ap,
    _reverse_running_max,
    _top_k_mask,
    _warn_empty,
)


class _GroupRanking(NamedTuple):
    """Known entries sorted by class, then descending score, then ascending row; arrays of shape ``(M,)``."""

    group: np.ndarray  # class of each entry, in [0, num_groups)
    score: np.ndarray
    positive: np.ndarray  # the others are known negatives
    run_end: np.ndarray  # True at the last entry of each run of tied scores within a class
    start: np.ndarray  # position of the first entry of each entry's class
    count: np.ndarray  # positives per class, shape (num_groups,)


def _rank_groups(group: np.ndarray, score: np.ndarray, positive: np.ndarray, num_groups: int) -> _GroupRanking:
    """Sort known entries for the per-class metrics.

    Args:
        group: Class of each entry, ``(M,)``, in ``[0, num_groups)``.
        score: Its score, ``(M,)``.
        positive: Whether it is a positive (the others are negatives), ``(M,)``.
        num_groups: Number of classes.

    Entries must come in ascending row order within each class (as ``by_class`` and ``np.nonzero`` give
    them): the sort is stable, so tied scores stay in row order, the order the VOC AP is defined with.
    """
    order = np.lexsort((-score, group))
    group, score, positive = group[order], score[order], positive[order]
    run_end = np.ones(group.size, bool)
    run_end[:-1] = (group[1:] != group[:-1]) | (score[1:] != score[:-1])
    start = np.searchsorted(group, np.arange(num_groups))[group]
    return _GroupRanking(group, score, positive, run_end, start, np.bincount(group[positive], minlength=num_groups))


def _group_ap(ranking: _GroupRanking, mode: APMode) -> np.ndarray:
    """AP of each class in [0, 1], shape ``(num_groups,)``; NaN for a class without a positive."""
    at = np.flatnonzero(ranking.positive)
    tp = np.concatenate([[0], np.cumsum(ranking.positive)])
    start = ranking.start[at]
    if mode == "sklearn":
        # ties form one threshold: a positive earns the precision at the end of its run of equal scores
        ends = np.flatnonzero(ranking.run_end)
        end = ends[np.searchsorted(ends, at)]
        credit = (tp[end + 1] - tp[start]) / (end + 1 - start)
    elif mode == "voc":
        # precision just at each positive, then the envelope (see _ap_from_ranking)
        precision = (tp[at + 1] - tp[start]) / (at + 1 - start)
        credit = _reverse_running_max(precision, ranking.group[at], ranking.count)
    else:
        raise AssertionError(mode)
    total = np.bincount(ranking.group[at], weights=credit, minlength=ranking.count.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ranking.count > 0, total / ranking.count, np.nan)


def _group_best_thresholds(ranking: _GroupRanking, fallback: float) -> np.ndarray:
    """Per-class F1-best threshold over the known entries (the rule of :func:`best_thresholds`), ``(num_groups,)``."""
    thresholds = np.full(ranking.count.size, fallback, dtype=np.float64)
    at = np.flatnonzero(ranking.positive)
    if at.size == 0:
        return thresholds
    ends = np.flatnonzero(ranking.run_end)
    end = ends[np.searchsorted(ends, at)]
    tp = np.concatenate([[0], np.cumsum(ranking.positive)])
    start = ranking.start[at]
    group = ranking.group[at]
    f1 = 2 * (tp[end + 1] - tp[start]) / (end + 1 - start + ranking.count[group])
    # positives come in descending score within each class: the first best one is the highest threshold
    order = np.lexsort((-f1, group))
    first = order[np.searchsorted(group[order], np.flatnonzero(ranking.count))]
    thresholds[group[first]] = ranking.score[at[first]]
    return thresholds


def _known_class_chunks(scores: np.ndarray, targets, chunk_entries: int, keep_row: np.ndarray | None = None):
    """The known entries of ``chunk_entries // N`` classes at a time, with their scores.

    Args:
        scores: ``(N, K)`` floats (ndarray or memmap); only the scores of known entries are read.
        targets: ``(N, K)`` dense, or sparse with ``by_class()``.
        chunk_entries: Dense cells of a class chunk.
        keep_row: Optional bool ``(N,)``: entries of other rows are left out.

    Yields:
        ``(c0, c1, group, rows, positive, score)``: classes ``[c0, c1)``; per entry ``(M,)`` its class relative
        to ``c0``, its row (ascending within a class), whether it is positive, and its score (floating).
    """
    if scores.ndim != 2 or tuple(scores.shape) != tuple(targets.shape):
        raise MlicError(f"scores and targets must both have shape (N, K); got {scores.shape} and {targets.shape}")
    n, k = scores.shape
    by_class = targets.by_class() if hasattr(targets, "by_class") else None
    step = max(1, chunk_entries // max(n, 1))
    for c0 in range(0, k, step):
        c1 = min(k, c0 + step)
        if by_class is not None:
            class_ptr, rows, values = by_class
            lo, hi = class_ptr[c0], class_ptr[c1]
            rows, values = rows[lo:hi], np.asarray(values[lo:hi])
            group = np.repeat(np.arange(c1 - c0), np.diff(class_ptr[c0:c1 + 1]))
        else:
            block = np.asarray(targets[:, c0:c1]).T  # a view of an in-memory matrix: (classes, N)
            group, rows = np.nonzero(block != -1)
            values = block[group, rows]
        if keep_row is not None:
            keep = keep_row[rows]
            group, rows, values = group[keep], rows[keep], values[keep]
        if values.size and not np.isin(values, (0, 1)).all():
            raise MlicError("targets must contain only 1 (positive), 0 (negative) and -1 (unknown)")
        score = np.asarray(scores[rows, group + c0])
        if not np.issubdtype(score.dtype, np.floating):
            score = score.astype(np.float64)
        if not np.isfinite(score).all():
            raise MlicError(f"scores contain NaN or infinity (classes {c0}..{c1 - 1})")
        yield c0, c1, group, rows, values == 1, score


def _keep_rows(n: int, rows: np.ndarray | None) -> np.ndarray | None:
    """Bool ``(N,)`` mask of ``rows`` (None stays None); refuses rows outside ``[0, N)``."""
    if rows is None:
        return None
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise MlicError(f"rows must lie in [0, {n}); got {rows.min()}..{rows.max()}")
    keep = np.zeros(n, bool)
    keep[rows] = True
    return keep


def known_average_precision(scores: np.ndarray, targets, chunk_entries: int = 1 << 22) -> np.ndarray:
    """Per-class AP over each class's known entries only, class chunk by class chunk (OpenImages protocol).

    Equal to :func:`average_precision` (``mode="sklearn"``) on data that fits, i.e. to
    ``average_precision_score`` over the entries whose target is not -1. Built for OpenImages
    size (125k test images x 9,605 classes, ~1% known): no copy of the score matrix is made, only
    the scores of the known entries of ``chunk_entries // N`` classes at a time are gathered, in
    the scores' own dtype; memory is O(known entries of a chunk) besides the inputs.

    Args:
        scores: ``(N, K)`` floats (an ndarray or a memory-mapped npy file); higher = more likely positive.
        targets: ``(N, K)`` 1 / 0 / -1, dense (ndarray, memmap) or sparse (an object with ``by_class()``
            returning ``(class_ptr (K+1,), rows, values)``, e.g. ``mlic.data.targets.SparseTargets``).
        chunk_entries: Dense cells of a class chunk (sets how many classes are processed at once).

    Returns:
        AP in [0, 1], shape ``(K,)``; NaN for classes with no known positive (with a warning).
    """
    ap = np.empty(scores.shape[1])
    for c0, c1, group, _, positive, score in _known_class_chunks(scores, targets, chunk_entries):
        ap[c0:c1] = _group_ap(_rank_groups(group, score, positive, c1 - c0), "sklearn")
    _warn_empty(ap, "their AP is NaN", stacklevel=3)
    return ap


def known_mean_average_precision(scores: np.ndarray, targets, empty: EmptyRule = "exclude",
                                 chunk_entries: int = 1 << 22) -> float:
    """Mean of :func:`known_average_precision`, in percent.

    Args:
        scores: ``(N, K)`` floats.
        targets: ``(N, K)`` 1 / 0 / -1, dense or sparse.
        empty: What a class without a known positive contributes. Default ``"exclude"``: with
            thousands of classes and ~1% of entries verified, many classes of an evaluation split
            have no positive, and counting them as 0 would measure the split rather than the model.
        chunk_entries: See :func:`known_average_precision`.

    Returns:
        mAP in percent.
    """
    _check_options("sklearn", empty)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # _mean_ap reports the same classes with the rule applied
        ap = known_average_precision(scores, targets, chunk_entries)
    return _mean_ap(ap, empty)


def known_best_thresholds(scores: np.ndarray, targets, fallback: float = 0.5, rows: np.ndarray | None = None,
                          chunk_entries: int = 1 << 22) -> np.ndarray:
    """:func:`best_thresholds` over the known entries only, class chunk by class chunk; for sparse targets.

    Equal to ``best_thresholds(scores[rows], np.asarray(targets)[rows])`` without densifying anything.

    Args:
        scores: ``(N, K)`` floats (ndarray or memmap); only the scores of known entries in ``rows`` are read.
        targets: ``(N, K)`` 1 / 0 / -1, dense or sparse (``by_class()``).
        fallback: Threshold of a class without a known positive.
        rows: Rows to use (e.g. the readable ones); default all.
        chunk_entries: See :func:`known_average_precision`.

    Returns:
        Thresholds, shape ``(K,)``, float64.
    """
    thresholds = np.empty(scores.shape[1])
    for c0, c1, group, _, positive, score in _known_class_chunks(scores, targets, chunk_entries,
                                                                  _keep_rows(scores.shape[0], rows)):
        thresholds[c0:c1] = _group_best_thresholds(_rank_groups(group, score, positive, c1 - c0), fallback)
    return thresholds


def _row_chunk_entries(targets, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Known entries of rows ``row_ids``: (position in ``row_ids``, class, value), each ``(M,)``."""
    if hasattr(targets, "by_class"):  # SparseTargets: take() gives its CSR rows, never a dense block
        part = targets.take(row_ids)
        return np.repeat(np.arange(row_ids.size), np.diff(part.indptr)), part.indices, part.values
    block = np.asarray(targets[row_ids])
    local, cls = np.nonzero(block != -1)
    return local, cls, block[local, cls]


def known_metrics_table(
    scores: np.ndarray,
    targets,
    threshold: float | np.ndarray = 0.5,
    empty: EmptyRule = "exclude",
    rows: np.ndarray | None = None,
    top3: bool = True,
    chunk_entries: int = 1 << 22,
) -> dict[str, float | np.ndarray]:
    """The evaluation table over the known entries only, for sparse (OpenImages-size) targets; in percent.

    Equal to :func:`metrics_table` on ``scores[rows]`` and the dense ``targets[rows]`` (-1 ignored, as there,
    and the same default rule ``empty="exclude"`` for classes without a known positive: the OpenImages
    protocol). Memory is O(known entries) plus one chunk:
    the target matrix is never densified and the scores are never copied whole.

    * ``"mAP"``, ``"mAP_voc"``, ``"per_class_ap"``: per-class AP over each class's known entries, gathered
      class chunk by class chunk (only the scores at known entries are read).
    * ``"CP"`` ... ``"OF1"``: per-class TP / predicted / positive counts from the same known entries. CP and
      CR are means over all K classes, as in :func:`threshold_metrics` (a class with no known entry adds 0).
    * ``"CP_top3"`` ... ``"OF1_top3"`` (when ``top3``): "top 3" is over all K scores of an image, so this one
      reads every score of ``rows``, ``chunk_entries // K`` rows at a time (a pass over the whole matrix).

    Args:
        scores: ``(N, K)`` floats, an ndarray or a memmap.
        targets: ``(N, K)`` 1 / 0 / -1: a ``SparseTargets`` (or anything with ``by_class()`` and ``take()``), or
            a dense array.
        threshold: Float or per-class ``(K,)`` threshold.
        empty: ``"exclude"``: the means are over the classes with at least one known positive;
            ``"zero"``: over all K classes, those without counting 0. A warning gives their number.
        rows: Rows to evaluate (e.g. the readable ones; duplicates count once); default all. Scores of
            other rows are never read, so they may be NaN.
        top3: Also compute the ``_top3`` metrics (one pass over every score of ``rows``).
        chunk_entries: Dense cells per class chunk and per row chunk.

    Returns:
        ``"mAP"``, ``"mAP_voc"``, ``"mAP_classes"`` (how many classes the means average), ``"CP"``, ``"CR"``,
        ``"CF1"``, ``"OP"``, ``"OR"``, ``"OF1"``, the six ``_top3`` keys when ``top3``, and ``"per_class_ap"``
        ``(K,)`` in percent, NaN for classes without a known positive.
    """
    _check_options("sklearn", empty)
    n, k = scores.shape
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim > 1 or threshold.size not in (1, k):
        raise MlicError(f"threshold must be a float or an array of shape ({k},), got {threshold.shape}")
    per_class_threshold = np.broadcast_to(threshold, (k,))
    keep_row = _keep_rows(n, rows)
    ap, ap_voc = np.empty(k), np.empty(k)
    true_pos, num_predicted, num_positive = np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros(k, np.int64)
    for c0, c1, group, _, positive, score in _known_class_chunks(scores, targets, chunk_entries, keep_row):
        ranking = _rank_groups(group, score, positive, c1 - c0)
        ap[c0:c1] = _group_ap(ranking, "sklearn")
        ap_voc[c0:c1] = _group_ap(ranking, "voc")
        predicted = score >= per_class_threshold[group + c0]
        num_predicted[c0:c1] = np.bincount(group[predicted], minlength=c1 - c0)
        true_pos[c0:c1] = np.bincount(group[predicted & positive], minlength=c1 - c0)
        num_positive[c0:c1] = np.bincount(group[positive], minlength=c1 - c0)
    table: dict[str, float | np.ndarray] = {"mAP": _mean_ap(ap, empty)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the same classes were just reported
        table["mAP_voc"] = _mean_ap(ap_voc, empty)
    table["mAP_classes"] = _averaged_classes(ap, empty)
    table.update(_counts_to_metrics(true_pos, num_predicted, num_positive))
    if top3:
        true_pos[:], num_predicted[:] = 0, 0
        row_ids = np.arange(n) if keep_row is None else np.flatnonzero(keep_row)
        step = max(1, chunk_entries // max(k, 1))
        for r0 in range(0, row_ids.size, step):
            chunk = row_ids[r0:r0 + step]
            block = np.asarray(scores[chunk[0]:chunk[-1] + 1] if chunk[-1] - chunk[0] + 1 == chunk.size
                               else scores[chunk])
            if not np.issubdtype(block.dtype, np.floating):
                block = block.astype(np.float64)
            local, cls, values = _row_chunk_entries(targets, chunk)
            score = block[local, cls]
            if not np.isfinite(score).all():
                raise MlicError(f"scores contain NaN or infinity (rows {chunk[0]}..{chunk[-1]})")
            predicted = (score >= per_class_threshold[cls]) & _top_k_mask(block, 3)[local, cls]
            num_predicted += np.bincount(cls[predicted], minlength=k)
            true_pos += np.bincount(cls[predicted & (values == 1)], minlength=k)
        table.update({f"{key}_top3": value for key, value in
                      _counts_to_metrics(true_pos, num_predicted, num_positive).items()})
    table["per_class_ap"] = ap * 100
    return table
