"""ONE training entry for both modes: ``run(job)``.

The mode decides only which steps feed the one loop (:func:`mlic.engine.loop.drive`): image batches
through backbone and head, end to end, or a linear head on cached backbone features; ``linear-init``
runs the second, then the first starting from its head and its loss state (Cole et al.'s protocol
behind the fine-tuned ROLE figure). Every run ends in the same :func:`finish` step (test metrics,
report, plots).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mlic.engine import dist
from mlic.engine.job import MODES, RunResult, TrainJob
from mlic.engine.threads import choose_threads, cpu_count
from mlic.errors import MlicError


def fit(job: TrainJob) -> RunResult:
    """Train ``job`` in its mode through the one loop, keep the best epoch by validation mAP (clean labels),
    evaluate it on test: the mode picks the steps that feed :func:`mlic.engine.loop.drive`."""
    from mlic.engine.linear_probe import FeatureSteps
    from mlic.engine.loop import ImageSteps, drive

    rank, world, device = dist.init_distributed()
    say = job.log if rank == 0 else (lambda *a, **k: None)
    steps = FeatureSteps.from_job(job) if job.mode == "linear" else ImageSteps(job, rank, world, device, say)
    test = job.splits.test
    return drive(steps, job.splits.val.targets, None if test is None else test.targets, job, main=rank == 0)


def run(job: TrainJob) -> RunResult:
    """Train in ``job.mode``, keep the best epoch by validation mAP, evaluate it on test, write the run folder."""

    if job.mode not in MODES:
        raise MlicError(f"--mode {job.mode!r}: choose one of {', '.join(MODES)}")
    if job.mode == "linear-init":
        if job.resume:
            raise MlicError("--resume continues a fine-tuning run; rerun --mode linear-init without it, or resume "
                            f"the fine-tuning phase with --mode finetune --init-from {Path(job.out) / 'linear'}")
        linear_dir = Path(job.out) / "linear"
        job.log(f"phase 1 of 2: linear probe into {linear_dir}")
        from mlic.config import TrainConfig

        shared = {k: getattr(job.train, k) for k in ("loss", "loss_args", "seed", "estimator_lr_mult")}
        if job.linear is not None and not isinstance(job.linear, TrainConfig):
            raise MlicError("TrainJob.linear: give a TrainConfig (e.g. TrainConfig.linear_defaults(batch_size=16)), "
                            f"not {type(job.linear).__name__}")
        phase = job.linear or TrainConfig.linear_defaults(len(job.splits.train), **shared)
        first = run(replace(job, mode="linear", out=linear_dir, train=phase, linear=None))
        job.log(f"phase 1: test mAP {first.test_metrics['mAP']:.2f}" if first.test_metrics else "phase 1 done")
        job.log("phase 2 of 2: fine-tuning from the linear head and its loss state")
        job = replace(job, mode="finetune", init_from=linear_dir)
    if job.mode == "linear" and (job.resume or job.init_from or job.checkpoint_every):
        raise MlicError("--resume, --init-from and --checkpoint-every are for fine-tuning; a linear probe reruns "
                        "from its cached features in seconds")
    threads, workers = choose_threads(job.train.workers, job.train.threads)
    torch.set_num_threads(threads)
    job = replace(job, train=replace(job.train, workers=workers, threads=threads))
    job.log(f"threads: {threads} torch threads, {workers} loader workers ({cpu_count()} cores; --threads and "
            "--workers override)")
    try:
        result = fit(job)
        if result.test_metrics is not None:
            finish(job, result)
    finally:
        dist.cleanup()  # leave the process group, so that every rank exits cleanly
    return result


def finish(job: TrainJob, result: RunResult) -> None:
    """What every finished run writes beside its model: test_metrics.json, test_scores.npy, report.md, plots."""
    import numpy as np

    from mlic.engine.report import write_metrics_json, write_report
    from mlic.io import atomic_save_npy

    out, test = Path(job.out), job.splits.test
    classes = job.splits.train.classes
    atomic_save_npy(out / "test_scores.npy", result.test_scores)
    write_metrics_json(out / "test_metrics.json", result.test_metrics, classes)
    targets = None if test.sparse else np.asarray(test.targets)  # PR curves need dense targets; sparse: none drawn
    write_report(out, f"mlic run {out.name}", result.test_metrics, classes, result.history, result.test_scores,
                 targets, notes=[f"model: {job.model.backbone} + {job.model.head}; loss "
                                 f"{job.train.loss}; mode {job.mode}; best epoch {result.best_epoch}"])
