"""Benchmark mlic.metrics against a scikit-learn per-class loop on a COCO-sized evaluation.

Run from the repository root with ``python bench/metrics.py`` once the package is installed
(``pip install -e .``), or with ``PYTHONPATH=.`` before that. Scores are 40,137 x 80 (the COCO-2014 val set), about 2.9
positives per image with a long-tailed class frequency, rounded to 4 decimals so that tied
scores occur. float32 is what a model's sigmoid gives; float64 takes the slower argsort path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import average_precision_score

from mlic.metrics import mean_average_precision, metrics_table

NUM_IMAGES, NUM_CLASSES, POSITIVES_PER_IMAGE = 40_137, 80, 2.9


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores (float32) and 0/1 targets, both ``(NUM_IMAGES, NUM_CLASSES)``."""
    rng = np.random.default_rng(seed)
    frequency = 1.0 / np.arange(1, NUM_CLASSES + 1) ** 0.8
    frequency *= POSITIVES_PER_IMAGE / frequency.sum()
    targets = (rng.random((NUM_IMAGES, NUM_CLASSES)) < frequency).astype(np.int64)
    logits = rng.normal(size=targets.shape) + 3.0 * targets - 2.5
    scores = np.round(1.0 / (1.0 + np.exp(-logits)), 4).astype(np.float32)
    return scores, targets


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def sklearn_map(scores: np.ndarray, targets: np.ndarray) -> float:
    return 100 * float(np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in range(scores.shape[1])]))


def main() -> None:
    scores32, targets = make_data()
    distinct = np.mean([np.unique(scores32[:, k]).size for k in range(NUM_CLASSES)])
    print(
        f"scores {scores32.shape}, {targets.sum(1).mean():.2f} positives per image, "
        f"{distinct:.0f} distinct scores per class on average, {os.cpu_count()} CPUs"
    )
    for scores in (scores32, scores32.astype(np.float64)):
        sklearn_time, expected = best_of(3, lambda: sklearn_map(scores, targets))
        our_time, got = best_of(3, lambda: mean_average_precision(scores, targets))
        assert abs(got - expected) < 1e-9, (got, expected)
        table_time, table = best_of(3, lambda: metrics_table(scores, targets))
        print(
            f"{scores.dtype}: mAP {got:.6f} (sklearn {expected:.6f})\n"
            f"  sklearn per-class loop {sklearn_time * 1e3:8.1f} ms\n"
            f"  mean_average_precision {our_time * 1e3:8.1f} ms   {sklearn_time / our_time:5.1f}x faster\n"
            f"  metrics_table          {table_time * 1e3:8.1f} ms   "
            f"(mAP_voc {table['mAP_voc']:.3f}, CF1 {table['CF1']:.3f}, OF1_top3 {table['OF1_top3']:.3f})"
        )


if __name__ == "__main__":
    main()
