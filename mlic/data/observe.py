"""Simulate incomplete labelling from full labels, reproducibly.

Output uses mlic's encoding: 1 observed positive, 0 observed negative, -1 unknown.
``observe_uniform`` reproduces Cole et al.'s generate_observed_labels.py draw for draw: one
``np.random.RandomState(seed)`` per split, rows in order, for each row a shuffle of its positive
indices (the first ``num_pos`` are kept) and then a shuffle of its negative indices (the first
``num_neg`` kept) — the second shuffle consumes random numbers even when ``num_neg`` is 0, and
that is kept so the same seed gives their exact matrices. Legacy RandomState streams are fixed
by NumPy's compatibility policy, so the same seed gives the same result on any machine.
"""

from __future__ import annotations

import numpy as np

from mlic.data.targets import check_targets
from mlic.errors import MlicError


def observe_uniform(targets: np.ndarray, num_pos: int = 1, num_neg: int = 0, seed: int = 1200) -> np.ndarray:
    """Keep ``num_pos`` random positives and ``num_neg`` random negatives per row (-1 = all of them).

    Args:
        targets: (N, K) full labels, 1 / 0 (entries already -1 are never observed).
        num_pos: positives observed per image (fewer when the image has fewer).
        num_neg: negatives observed per image.
        seed: seed of the RandomState.

    Returns:
        int8 (N, K) observed labels: 1, 0, or -1 unknown.
    """
    targets = check_targets(targets)
    rng = np.random.RandomState(seed)
    observed = np.full(targets.shape, -1, dtype=np.int8)
    for i, row in enumerate(targets):
        pos = np.nonzero(row == 1)[0]
        rng.shuffle(pos)
        observed[i, pos if num_pos == -1 else pos[:num_pos]] = 1
        neg = np.nonzero(row == 0)[0]
        rng.shuffle(neg)
        observed[i, neg if num_neg == -1 else neg[:num_neg]] = 0
    return observed


def single_positive(targets: np.ndarray, seed: int = 1200) -> np.ndarray:
    """One positive kept per image, every other entry unknown (Cole et al. 2021). Images without a
    positive stay all unknown."""
    return observe_uniform(targets, num_pos=1, num_neg=0, seed=seed)


def partial(targets: np.ndarray, keep: float, seed: int = 1200) -> np.ndarray:
    """Each known entry kept with probability ``keep``, independently; the rest become unknown (-1)."""
    if not 0.0 <= keep <= 1.0:
        raise MlicError(f"keep must be a probability in [0, 1], got {keep}")
    targets = check_targets(targets)
    mask = np.random.RandomState(seed).random_sample(targets.shape) < keep
    return np.where(mask, targets, np.int8(-1)).astype(np.int8)


def observe(targets: np.ndarray, scheme: str | None, seed: int = 1200) -> np.ndarray | None:
    """Apply an observation scheme by name: None/"full", "single-positive", or "partial:P" (0 < P ≤ 1)."""
    if scheme in (None, "", "full"):
        return None
    if scheme in ("single-positive", "single_positive", "spl"):
        return single_positive(targets, seed)
    if scheme.startswith("partial:"):
        try:
            keep = float(scheme.split(":", 1)[1])
        except ValueError:
            raise MlicError(f"bad observation scheme '{scheme}': write partial:P with P a number, e.g. partial:0.3")
        return partial(targets, keep, seed)
    raise MlicError(f"unknown observation scheme '{scheme}': use full, single-positive or partial:P")
