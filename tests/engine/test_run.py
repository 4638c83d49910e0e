"""mlic.engine.run: threads and workers from the cores, the refusals before any work, what finish writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mlic.config import ModelConfig, TrainConfig
from mlic.data.labelset import LabelSet
from mlic.data.splits import Splits
from mlic.engine import threads as threads_module
from mlic.engine.evaluate import evaluate_scores
from mlic.engine.job import RunResult, TrainJob
from mlic.engine.run import finish, run
from mlic.engine.threads import choose_threads, cpu_count
from mlic.errors import MlicError

CLASSES = ["a", "b", "c"]


def labelset(split: str, n: int, seed: int) -> LabelSet:
    rng = np.random.RandomState(seed)
    targets = (rng.rand(n, 3) < 0.5).astype(np.int8)
    targets[np.arange(n), np.arange(n) % 3] = 1  # every class has a positive
    return LabelSet(CLASSES, [f"{split}/{i}.png" for i in range(n)], targets, split=split)


@pytest.fixture
def job(tmp_path):
    def make(**kwargs) -> TrainJob:
        splits = Splits(labelset("train", 12, 0), labelset("val", 6, 1), labelset("test", 9, 2))
        return TrainJob(ModelConfig(num_classes=3, img_size=32), TrainConfig(epochs=1), splits, tmp_path / "run",
                        log=lambda *a: None, **kwargs)

    return make


@pytest.fixture
def cores(monkeypatch):
    def set_machine(count: int, cuda: bool = False) -> None:
        monkeypatch.setattr(threads_module, "cpu_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    return set_machine


def test_cpu_count_is_the_cores_this_process_may_use():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cpu_count() == expected >= 1


@pytest.mark.parametrize(("count", "workers", "threads", "expected"), [
    (8, None, None, (6, 2)),   # CPU: a worker per four cores, the rest as threads
    (2, None, None, (2, 0)),   # two cores: no worker, both cores for the matmuls
    (1, None, None, (1, 0)),
    (8, 0, None, (8, 0)),      # workers given: the other cores become threads
    (8, 6, None, (2, 6)),
    (8, 8, None, (1, 8)),      # never fewer than one thread
    (8, None, 3, (3, 2)),      # threads given: kept as given
    (8, 4, 4, (4, 4)),
])
def test_choose_threads_on_a_cpu(cores, count, workers, threads, expected):
    cores(count)
    assert choose_threads(workers, threads) == expected


@pytest.mark.parametrize(("count", "expected"), [(16, (1, 8)), (4, (1, 3)), (1, (1, 0))])
def test_choose_threads_on_a_gpu_leaves_the_cores_to_decoding(cores, count, expected):
    cores(count, cuda=True)
    assert choose_threads(None, None) == expected


def test_an_unknown_mode_is_refused(job):
    with pytest.raises(MlicError, match=r"^--mode 'lineal': choose one of finetune, linear, linear-init$"):
        run(job(mode="lineal"))
    assert not (job().out).exists()


def test_linear_init_refuses_resume_and_says_what_to_do(job):
    with pytest.raises(MlicError, match="--resume continues a fine-tuning run") as caught:
        run(job(mode="linear-init", resume=True))
    assert f"--init-from {Path(job().out) / 'linear'}" in str(caught.value)
    assert not job().out.exists()


def test_linear_init_refuses_a_linear_phase_that_is_not_a_train_config(job):
    with pytest.raises(MlicError, match="TrainJob.linear: give a TrainConfig"):
        run(job(mode="linear-init", linear={"batch_size": 16}))


@pytest.mark.parametrize("setting", [{"resume": True}, {"init_from": Path("elsewhere")}, {"checkpoint_every": 5.0}])
def test_linear_refuses_fine_tuning_settings(job, setting):
    with pytest.raises(MlicError, match="are for fine-tuning; a linear probe reruns from its cached features"):
        run(job(mode="linear", **setting))


def test_finish_writes_test_metrics_scores_and_report(job):
    the_job = job()
    the_job.out.mkdir()
    test = the_job.splits.test
    scores = np.random.RandomState(0).rand(len(test), 3).astype(np.float32)
    metrics = evaluate_scores(scores, test.targets)
    history = [{"epoch": 1, "train_loss": 0.7, "val_mAP": 50.0}, {"epoch": 2, "train_loss": 0.5, "val_mAP": 60.0}]
    result = RunResult(the_job.out, best_epoch=2, best_val_map=60.0, test_metrics=metrics, history=history,
                       test_scores=scores)
    finish(the_job, result)
    written = json.loads((the_job.out / "test_metrics.json").read_text())
    assert written["mAP"] == pytest.approx(metrics["mAP"])
    assert set(written["per_class_ap"]) == set(CLASSES)
    np.testing.assert_array_equal(np.load(the_job.out / "test_scores.npy"), scores)
    report = (the_job.out / "report.md").read_text()
    assert "best epoch 2" in report and "mode finetune" in report
    for plot in ("training.png", "per_class_ap.png", "pr_curves.png"):
        assert (the_job.out / plot).stat().st_size > 0, plot
