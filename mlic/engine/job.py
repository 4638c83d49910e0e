"""What a training job is (:class:`TrainJob`) and what it returns (:class:`RunResult`), for both modes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlic.config import ModelConfig, TrainConfig
from mlic.data.splits import Splits

MODES = ("finetune", "linear", "linear-init")
"""finetune: backbone + head end to end; linear: a linear head on cached backbone features; linear-init:
linear, then finetune starting from its head and its loss state (Cole et al.'s ``linear_init``)."""


@dataclass
class TrainJob:
    """One training run, in either mode: everything :func:`mlic.engine.run.run` needs."""

    model: ModelConfig
    """The classifier to build (num_classes equals the data's)."""
    train: TrainConfig
    """Optimisation settings (the fine-tuning phase's, under linear-init)."""
    splits: Splits
    """train (observed labels used when present), val (clean labels), test (optional)."""
    out: Path
    """The run folder."""
    mode: str = "finetune"
    """One of :data:`MODES`."""
    linear: dict = field(default_factory=dict)
    """Settings of the linear phase (LinearProbeConfig fields: epochs, batch_size, lr, estimator_update, ...)."""
    pretrained: str | None = None
    """Local backbone weight file."""
    init_from: Path | None = None
    """A finished run whose model weights and loss state (e.g. ROLE's estimated labels) the run starts from."""
    resume: bool = False
    """Continue from ``out/last.pt``."""
    checkpoint_every: float | None = None
    """Minutes between checkpoints inside an epoch (None: only at epoch ends)."""
    strict_images: bool = False
    """Stop at the first unreadable image."""
    max_bad_images: float = 0.01
    """Unreadable images tolerated per split: a share (< 1) or a count (≥ 1)."""
    progress: bool = True
    """Show progress bars."""
    log: Callable = print
    """Where lines are printed (rank 0 only)."""


@dataclass
class RunResult:
    """What a finished run returns, whatever the mode."""

    out_dir: Path
    best_epoch: int
    """1-based epoch kept by validation mAP."""
    best_val_map: float
    test_metrics: dict | None
    """Metrics table of the best model on test (None without test, or on ranks other than 0)."""
    history: list[dict]
    """One record per epoch (the lines of metrics.jsonl)."""
    bad_images: int = 0
    """Unreadable training images skipped (last epoch)."""
    test_scores: np.ndarray | None = None
    """(N, K) test scores, NaN rows for unreadable images."""
    seconds: float = 0.0
    """Wall-clock time of the training."""
