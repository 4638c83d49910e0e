"""Time and memory of the known-entries mAP and metrics table (OpenImages protocol) at OpenImages test size.

Synthetic problem: ``--images`` x ``--classes`` float32 scores (default 125,436 x 9,605, the size
of OpenImages' test split and ML-Decoder's trainable classes) held in memory, sparse targets with
``--known`` verified labels per image (distinct classes, 30% positive), positives scoring higher
on average. It times :func:`mlic.known_metrics.known_mean_average_precision`, then the whole table
:func:`mlic.known_metrics.known_metrics_table` without and with the top-3 metrics (these read every score, row
chunk by row chunk), and reports

* the extra memory the metric allocates beyond its inputs (``tracemalloc`` peak; NumPy reports
  its allocations to it), and the peak RSS of the whole process (inputs included);
* a check of 20 random classes against ``sklearn.metrics.average_precision_score`` on their known
  entries; with ``--compare-dense``, the dense ``metrics_table`` on the densified targets (small sizes only).

    python bench/eval_openimages.py --images 125436 --classes 9605
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
import warnings

import numpy as np
from sklearn.metrics import average_precision_score

from mlic.data.targets import SparseTargets
from mlic.known_metrics import known_average_precision, known_mean_average_precision, known_metrics_table
from mlic.metrics import mean_average_precision, metrics_table


def problem(images: int, classes: int, known: int, seed: int = 0) -> tuple[np.ndarray, SparseTargets]:
    """Scores (N, K) float32 and sparse targets with ``known`` entries per row."""
    rng = np.random.default_rng(seed)
    scores = np.empty((images, classes), np.float32)
    for start in range(0, images, 4096):
        scores[start:start + 4096] = rng.random((min(4096, images - start), classes), dtype=np.float32)
    indptr = np.arange(images + 1, dtype=np.int64) * known
    first = np.repeat(rng.integers(0, classes, images), known)
    indices = ((first + np.tile(np.arange(known), images) * 7919) % classes).astype(np.int32)
    indices = np.sort(indices.reshape(images, known), axis=1).ravel()  # ascending within a row, as documented
    values = (rng.random(images * known) < 0.3).astype(np.int8)
    rows = np.repeat(np.arange(images), known)
    scores[rows[values == 1], indices[values == 1]] += np.float32(0.5)
    return scores, SparseTargets(indptr, indices, values, classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=125_436)
    parser.add_argument("--classes", type=int, default=9_605)
    parser.add_argument("--known", type=int, default=8, help="verified labels per image")
    parser.add_argument("--chunk-entries", type=int, default=1 << 22)
    parser.add_argument("--compare-dense", action="store_true",
                        help="also run mean_average_precision (one sort of the whole matrix) on dense targets")
    args = parser.parse_args()
    t = time.perf_counter()
    scores, targets = problem(args.images, args.classes, args.known)
    print(f"scores {scores.shape} float32: {scores.nbytes / 2**30:.2f} GiB; {targets.nnz:,} known entries "
          f"(built in {time.perf_counter() - t:.0f} s)")

    tracemalloc.start()
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = known_mean_average_precision(scores, targets, chunk_entries=args.chunk_entries)
    seconds = time.perf_counter() - t
    _, extra = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    note = "; ".join(str(w.message) for w in caught) or "every class has a known positive"
    print(f"known-entries mAP {value:.2f} ({note})")
    print(f"time {seconds:.1f} s; metric's own peak allocation {extra / 2**20:.0f} MiB; "
          f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (inputs included)")

    tables = {}
    for top3 in (False, True):
        tracemalloc.start()
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tables[top3] = known_metrics_table(scores, targets, top3=top3, chunk_entries=args.chunk_entries)
        seconds = time.perf_counter() - t
        _, extra = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        table = tables[top3]
        shown = "  ".join(f"{key} {table[key]:.2f}" for key in ("mAP", "mAP_voc", "CF1", "OF1", "CF1_top3", "OF1_top3")
                          if key in table)
        print(f"known_metrics_table{' with top-3' if top3 else ' (no top-3)'}: time {seconds:.1f} s; own peak "
              f"allocation {extra / 2**20:.0f} MiB; {shown}; averaged over {table['mAP_classes']} classes")
    assert tables[True]["mAP"] == value
    from mlic.engine.evaluate import evaluate_scores

    rows = np.arange(1, args.images)  # as after one unreadable image: every row but the first
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_scores(scores, targets, rows=rows)
    print(f"evaluate_scores (what mlic eval and the trainer run: finiteness check of the rows, then the table "
          f"with top-3) on {rows.size:,} rows: {time.perf_counter() - t:.1f} s")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = known_average_precision(scores, targets)
    class_ptr, rows, values = targets.by_class()
    checked = 0
    for c in np.random.default_rng(1).choice(args.classes, 20, replace=False):
        lo, hi = class_ptr[c], class_ptr[c + 1]
        if values[lo:hi].sum() == 0:
            continue
        reference = average_precision_score(values[lo:hi], scores[rows[lo:hi], c])
        assert abs(ap[c] - reference) < 1e-9, (c, ap[c], reference)
        checked += 1
    print(f"{checked} random classes equal sklearn's average_precision_score on their known entries")
    if args.compare_dense:
        dense = np.asarray(targets)
        tracemalloc.start()
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = mean_average_precision(scores, dense, empty="exclude")
        seconds = time.perf_counter() - t
        _, extra = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"mean_average_precision on the dense targets: {reference:.2f}, {seconds:.1f} s, "
              f"own peak allocation {extra / 2**20:.0f} MiB (equal: {abs(reference - value) < 1e-9})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense_table = metrics_table(scores, dense, empty="exclude")
        differences = [abs(dense_table[key] - tables[True][key]) for key in dense_table if key != "per_class_ap"]
        print(f"metrics_table on the dense targets: largest difference from known_metrics_table "
              f"{max(differences):.1e} over {len(differences)} figures")


if __name__ == "__main__":
    main()
