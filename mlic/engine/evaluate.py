"""Score a data set with a model (one process or sharded across DDP ranks, from files or shards) and compute
the metrics table."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from mlic.data.images import BadImageCheck, ImageDataset, build_transform, make_loader, normalize
from mlic.data.labelset import LabelSet
from mlic.data.shards import ShardDataset
from mlic.data.targets import SparseTargets, is_sparse
from mlic.engine import dist
from mlic.errors import MlicError
from mlic.known_metrics import known_best_thresholds, known_metrics_table
from mlic.metrics import best_thresholds, metrics_table
from mlic.progress import progress_bar


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting ("auto", "bf16", "fp16", "off") on ``device``; None = fp32."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        if amp in ("bf16", "auto"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp == "bf16":
        return torch.bfloat16  # asked for explicitly; on CPUs without bf16 units this is slow
    return None


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: Iterable, mean, std, device: torch.device,
                   amp_dtype: torch.dtype | None = None, progress=None,
                   check: BadImageCheck | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sigmoid scores (N, K) float32 of every decodable row, their dataset indices (N,), and bad-file messages.

    ``check`` counts the unreadable rows as they come (and stops past its limit) and refuses a pass that
    read no image at all.
    """
    model.eval()
    scores, indices, bad = [], [], []
    for images, _, idx, errors in loader:
        bad += errors
        if check is not None:
            check.add(errors)
        if len(idx):
            x = normalize(images.to(device, non_blocking=True), mean, std)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
            scores.append(torch.sigmoid(logits.float()).cpu())
            indices.append(idx)
        if progress is not None:
            progress()
    if check is not None:
        check.finish(sum(len(i) for i in indices))
    if not scores:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), bad
    return torch.cat(scores).numpy(), torch.cat(indices).numpy(), bad


def score_labelset(model: torch.nn.Module, labelset: LabelSet, img_size: int, mean, std, device: torch.device,
                   batch_size: int = 128, workers: int = 0, amp_dtype: torch.dtype | None = None,
                   check: BadImageCheck | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores (N, K) for a LabelSet; rows of undecodable images are NaN; returns (scores, readable rows, messages).

    ``check`` defaults to the usual limit (1 % of the split unreadable, and at least one readable image).
    """
    check = check or BadImageCheck(labelset.split or "data", len(labelset))
    dataset = ImageDataset(labelset, build_transform(img_size, train=False), targets=labelset.targets)
    scores, rows = score_sharded(model, dataset, batch_size, workers, mean, std, device, amp_dtype, check=check)
    return scores, rows, check.messages


def scoring_data(split: str, splits, transform) -> ImageDataset | ShardDataset:
    """What :func:`score_sharded` reads for ``split``: its shards, in order, when it streams, else its files."""
    labelset = getattr(splits, split)
    targets = labelset.train_targets if split == "train" else labelset.targets
    if split in splits.shards:
        return ShardDataset(splits.shards[split], transform, targets="train" if split == "train" else "clean",
                            shuffle=False, idle_ranks=True)
    return ImageDataset(labelset, transform, targets=targets)


def score_sharded(model: torch.nn.Module, dataset: ImageDataset | ShardDataset, batch_size: int, workers: int,
                  mean, std, device: torch.device, amp_dtype: torch.dtype | None, check: BadImageCheck | None = None,
                  seed: int | None = None, description: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, K) of a whole dataset (NaN rows for unreadable images) and the readable rows (sorted);
    under DDP each rank scores every ``world``-th row (from shards: its own shards) and the parts are
    gathered on every rank. ``seed`` seeds each sample's transform (files only)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if isinstance(dataset, ShardDataset):
        num_rows, num_classes = dataset.index.num_rows, dataset.num_classes
        loader = make_loader(dataset, batch_size, workers=workers)
        if check is not None:  # images 'mlic prepare shards' could not read (every rank: the checks must agree)
            check.add([f"{entry['path']}: {entry['reason']}" for entry in dataset.index.skipped])
        steps = -(-len(dataset) // batch_size)
    else:
        num_rows, num_classes = len(dataset), dataset.labelset.num_classes
        rows = range(rank, len(dataset), world)
        items = [(i, (seed * 1_000_033 + i) % 2**62) for i in rows] if seed is not None else list(rows)
        loader = make_loader(dataset, batch_size, workers=workers, sampler=items)
        steps = len(loader)
    bar = progress_bar(steps, description, enabled=description is not None)
    scores, idx, bad = predict_loader(model, loader, mean, std, device, amp_dtype, progress=bar.advance)
    bar.close()
    full = np.full((num_rows, num_classes), np.nan, dtype=np.float32)
    readable = []
    for part_scores, part_idx, part_bad in dist.gather_objects((scores, idx, bad)):
        if len(part_idx):
            full[part_idx] = part_scores
        readable.append(part_idx)
        if check is not None:
            check.add(part_bad)
    rows = np.unique(np.concatenate(readable))  # unique: padding may score a row twice
    if check is not None:
        check.finish(len(rows))
    return full, rows


class DivergedError(MlicError):
    """A model produced scores that are not finite."""


def _nonfinite_rows(scores: np.ndarray, rows: np.ndarray | None, chunk_cells: int = 1 << 22) -> int:
    """Rows (of ``rows``, default all) holding a non-finite score, read ``chunk_cells`` scores at a time."""
    rows = np.arange(len(scores)) if rows is None else np.asarray(rows)
    chunk_rows = max(1, chunk_cells // max(scores.shape[1], 1))
    return sum(int((~np.isfinite(scores[rows[i:i + chunk_rows]])).any(axis=1).sum())
               for i in range(0, rows.size, chunk_rows))


def _diverged(bad: int, total: int) -> DivergedError:
    return DivergedError(f"the model's scores are not finite for {bad} of {total} images: training "
                         "diverged; train again with a lower --lr or with --amp off")


def evaluate_scores(scores: np.ndarray, targets: np.ndarray | SparseTargets, threshold=0.5,
                    rows: np.ndarray | None = None) -> dict:
    """The metrics table of ``scores`` (N, K) against ``targets`` (N, K), over ``rows`` only when given.

    Pass the readable rows of :func:`score_labelset`; a non-finite score among them means the model
    diverged, which is an error, not a row to drop. Unknown (-1) entries are left out, and one rule holds
    for dense and sparse targets alike (every evaluation: ``mlic eval``, validation, test): a class without
    a known positive has AP NaN and is left out of the mAP; ``"mAP_classes"`` says how many were averaged
    (all K where every class has a positive). Sparse targets (:class:`SparseTargets`) are never densified:
    the table is :func:`mlic.known_metrics.known_metrics_table`, over the known entries only.
    """
    if is_sparse(targets):
        if rows is not None:
            rows = np.unique(rows)
        bad = _nonfinite_rows(scores, rows)
        if bad:
            raise _diverged(bad, len(scores) if rows is None else rows.size)
        return known_metrics_table(scores, targets, threshold=threshold, empty="exclude", rows=rows)
    targets = np.asarray(targets)
    if rows is not None:
        scores, targets = scores[rows], targets[rows]
    if not np.isfinite(scores).all():
        raise _diverged(int((~np.isfinite(scores)).any(axis=1).sum()), len(scores))
    return metrics_table(scores, targets, threshold=threshold, empty="exclude")


def fit_thresholds(scores: np.ndarray, targets: np.ndarray | SparseTargets,
                   rows: np.ndarray | None = None) -> np.ndarray:
    """Per-class F1-best thresholds (K,) on ``rows`` (default all); sparse targets over their known entries only."""
    if is_sparse(targets):
        return known_best_thresholds(scores, targets, rows=rows)
    if rows is None:
        return best_thresholds(scores, np.asarray(targets))
    return best_thresholds(scores[rows], np.asarray(targets)[rows])
