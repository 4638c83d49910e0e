"""Cole et al.'s protocol around the linear probe: the batch-size × learning-rate grid picked on
validation, and several seeds summarised as mean ± std."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mlic.engine.linear import Features, LinearProbeConfig, LinearProbeResult, train_linear_probe
from mlic.errors import MlicError


@dataclass
class GridResult:
    """Outcome of :func:`grid_search`: the run with the best validation mAP, and a row per run."""

    best: LinearProbeResult
    runs: list[dict]


def grid_search(
    train_x: Features, train_y: np.ndarray, val_x: Features, val_y: np.ndarray,
    config: LinearProbeConfig | None = None, batch_sizes: tuple[int, ...] = (8, 16),
    lrs: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5), test_x: Features | None = None,
    test_y: np.ndarray | None = None,
) -> GridResult:
    """Cole et al.'s grid over batch size × learning rate; the run is picked by its best validation mAP.

    Args:
        train_x, train_y, val_x, val_y, test_x, test_y: as in :func:`train_linear_probe`.
        config: settings shared by every run (batch_size and lr are overridden).
        batch_sizes: batch sizes tried (Cole: 8, 16).
        lrs: learning rates tried (Cole: 1e-2, 1e-3, 1e-4, 1e-5).

    Returns:
        The best run and, per run, batch_size, lr, best_epoch, val_map, test_map, seconds.
    """
    config = config or LinearProbeConfig()
    best: LinearProbeResult | None = None
    runs = []
    for batch_size in batch_sizes:
        for lr in lrs:
            result = train_linear_probe(train_x, train_y, val_x, val_y, replace(config, batch_size=batch_size, lr=lr),
                                        test_x, test_y)
            runs.append({"batch_size": batch_size, "lr": lr, "best_epoch": result.best_epoch,
                         "val_map": result.val_map, "test_map": result.test_map, "seconds": result.seconds})
            if best is None or result.val_map > best.val_map:
                best = result
    return GridResult(best=best, runs=runs)


@dataclass
class SeedSummary:
    """Mean ± sample standard deviation (ddof=1; 0 for one seed) of runs differing only in their seed."""

    seeds: list[int]
    val_maps: list[float]
    test_maps: list[float | None]
    val_mean: float
    val_std: float
    test_mean: float | None
    test_std: float | None

    def __str__(self) -> str:
        text = f"val mAP {self.val_mean:.2f} ± {self.val_std:.2f}"
        if self.test_mean is not None:
            text += f", test mAP {self.test_mean:.2f} ± {self.test_std:.2f}"
        return text + f" over {len(self.seeds)} seeds"


def summarize_seeds(results: list[LinearProbeResult]) -> SeedSummary:
    """Mean ± std of validation and test mAP over runs (e.g. one per seed)."""
    if not results:
        raise MlicError("no results to summarise")

    def stats(values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=np.float64)
        return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0

    val_mean, val_std = stats([r.val_map for r in results])
    tests = [r.test_map for r in results]
    test_mean = test_std = None
    if all(t is not None for t in tests):
        test_mean, test_std = stats(tests)
    return SeedSummary([r.config.seed for r in results], [r.val_map for r in results], tests, val_mean, val_std,
                       test_mean, test_std)


def run_seeds(train_x: Features, train_y: np.ndarray, val_x: Features, val_y: np.ndarray,
              config: LinearProbeConfig | None = None, seeds: tuple[int, ...] = (0, 1, 2),
              test_x: Features | None = None, test_y: np.ndarray | None = None) -> SeedSummary:
    """Train once per seed with otherwise equal settings and summarise (mean ± std)."""
    config = config or LinearProbeConfig()
    results = [train_linear_probe(train_x, train_y, val_x, val_y, replace(config, seed=s), test_x, test_y)
               for s in seeds]
    return summarize_seeds(results)
