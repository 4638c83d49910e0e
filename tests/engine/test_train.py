"""Fine-tuning (``mlic.engine.loop.drive`` with ImageSteps, through ``mlic.engine.run.run``): results, resume."""

import json

import numpy as np
import pytest
import torch

from mlic.config import ModelConfig, TrainConfig
from mlic.data.splits import Splits
from mlic.engine.checkpoint import load_model
from mlic.engine.evaluate import evaluate_scores, score_labelset
from mlic.engine.job import TrainJob
from mlic.engine.loop import TrainingError
from mlic.engine.run import fit, run
from mlic.losses import LOSSES
from mlic.optim import EMA


def quick(**kw):
    base = dict(epochs=2, batch_size=32, lr=3e-3, workers=0, hflip=False, seed=0)
    return TrainConfig(**(base | kw))


def spy_batches(monkeypatch, loss: str) -> list:
    """Record (indices, targets) of every batch the registered loss ``loss`` is called with."""
    seen = []

    class Spy(LOSSES[loss]):
        def forward(self, logits, targets, indices=None):
            seen.append((indices.clone(), targets.clone()))
            return super().forward(logits, targets, indices)

    monkeypatch.setitem(LOSSES, loss, Spy)
    return seen


def job(splits, out, cfg=None, model=None, train=None, **kw) -> TrainJob:
    return TrainJob(model or ModelConfig(num_classes=10, img_size=32), cfg or quick(),
                    Splits(train or splits["train"], splits["val"], kw.pop("test", None)), out, progress=False,
                    log=kw.pop("log", lambda *a, **k: None), **kw)


def test_trains_checkpoints_and_evaluates(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    result = run(job(splits, tmp_path / "run", quick(ema=0.9, epochs=3), test=splits["test"]))
    assert result.best_epoch >= 1 and len(result.history) == 3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    model, meta = load_model(tmp_path / "run")
    assert meta["classes"] == splits["train"].classes and len(meta["thresholds"]) == 10
    assert meta["train"]["ema"] == 0.9
    # the reported test metrics are those of the saved best model, scored again from its files
    scores, rows, _ = score_labelset(model, splits["test"], 32, model.config.mean, model.config.std,
                                     torch.device("cpu"))
    again = evaluate_scores(scores, splits["test"].targets, rows=rows)
    assert again["mAP"] == pytest.approx(result.test_metrics["mAP"], abs=1e-4)
    saved = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert saved["mAP"] == pytest.approx(result.test_metrics["mAP"])
    # the model kept is the one of the best validation epoch: it scores that epoch's val mAP again
    scores, rows, _ = score_labelset(model, splits["val"], 32, model.config.mean, model.config.std,
                                     torch.device("cpu"))
    assert evaluate_scores(scores, splits["val"].targets, rows=rows)["mAP"] == pytest.approx(result.best_val_map,
                                                                                             abs=1e-4)
    assert result.best_val_map == max(h["val_mAP"] for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_sparse_partial_val_and_test_are_scored_over_known_entries(tiny_digits, tmp_path):
    from mlic.data.labelset import LabelSet
    from mlic.data.targets import SparseTargets
    from mlic.engine.evaluate import fit_thresholds

    class Refusing(SparseTargets):  # row reads (targets[i]) and columns only: densifying fails the test
        def __array__(self, dtype=None, copy=None):
            raise AssertionError("densified")

        def rows(self, rows):
            raise AssertionError("densified rows")

    def partial(labelset, seed):
        dense = np.asarray(labelset.targets).copy()
        dense[np.random.default_rng(seed).random(dense.shape) < 0.5] = -1
        dense[:, 9] = np.where(dense[:, 9] == 1, -1, dense[:, 9])  # class 9: no known positive
        sparse = SparseTargets.from_dense(dense)
        return LabelSet(labelset.classes, labelset.image_paths, Refusing(sparse.indptr, sparse.indices,
                                                                         sparse.values, 10), labelset.root)

    splits, _, _ = tiny_digits
    val, test = partial(splits["val"], 0), partial(splits["test"], 1)
    result = run(job({"train": splits["train"], "val": val}, tmp_path / "run", quick(epochs=1), test=test))
    assert np.isfinite(result.best_val_map) and result.test_metrics["mAP_classes"] == 9
    assert np.isnan(result.test_metrics["per_class_ap"][9])
    model, meta = load_model(tmp_path / "run")
    scored = {}
    for name, labelset, reported in (("val", val, result.best_val_map), ("test", test, result.test_metrics["mAP"])):
        scores, rows, _ = score_labelset(model, labelset, 32, model.config.mean, model.config.std,
                                         torch.device("cpu"))
        assert evaluate_scores(scores, labelset.targets, rows=rows)["mAP"] == pytest.approx(reported, abs=1e-4)
        scored[name] = scores, rows
    # the thresholds saved with the model are tuned on the known entries of the validation set
    scores, rows = scored["val"]
    thresholds = fit_thresholds(scores, val.targets, rows)
    assert thresholds[9] == 0.5 and (thresholds[:9] != 0.5).all()
    np.testing.assert_allclose(meta["thresholds"], thresholds, atol=1e-4)



def test_sparse_training_labels_stay_sparse(tiny_digits, tmp_path, monkeypatch):
    from mlic.data.labelset import LabelSet
    from mlic.data.targets import SparseTargets

    class NoWhole(SparseTargets):  # batches may read their rows; reading the whole matrix fails the test
        def __array__(self, dtype=None, copy=None):
            raise AssertionError("densified")

    splits, _, _ = tiny_digits
    clean = np.asarray(splits["train"].targets)
    observed = clean.copy()
    observed[np.random.default_rng(0).random(clean.shape) < 0.6] = -1
    clean_sparse, observed_sparse = (NoWhole(p.indptr, p.indices, p.values, 10)
                                     for p in (SparseTargets.from_dense(m) for m in (clean, observed)))
    train = LabelSet(splits["train"].classes, splits["train"].image_paths, clean_sparse, splits["train"].root,
                     observed=observed_sparse)
    seen = spy_batches(monkeypatch, "an")
    result = run(job(splits, tmp_path / "run", quick(epochs=1, loss="an"), train=train))
    assert np.isfinite(result.history[0]["train_loss"]) and seen
    for indices, targets in seen:  # each batch materialised exactly its own observed rows
        np.testing.assert_array_equal(targets.numpy(), observed[indices.numpy()])
    with pytest.raises(TrainingError, match=r"corrects labels in place, which needs the dense 160 x 10 label matrix"):
        run(job(splits, tmp_path / "cp", quick(epochs=1, loss="ll_cp"), train=train))


def test_partial_labels_reach_the_loss_by_dataset_row(tiny_digits, tmp_path, monkeypatch):
    from mlic.data.observe import single_positive

    splits, _, _ = tiny_digits
    observed = single_positive(np.asarray(splits["train"].targets), 0)
    seen = spy_batches(monkeypatch, "an")
    tr = splits["train"].with_observed(observed)
    result = run(job(splits, tmp_path / "run", quick(epochs=1, loss="an"), train=tr))
    assert np.isfinite(result.history[0]["train_loss"])
    rows = torch.cat([i for i, _ in seen])
    assert sorted(rows.tolist()) == list(range(len(tr)))[:len(rows)] or len(set(rows.tolist())) == len(rows)
    for indices, targets in seen:  # the observed labels of exactly these rows, unknowns included
        np.testing.assert_array_equal(targets.numpy(), observed[indices.numpy()])
    assert any((t == -1).any() for _, t in seen)


def test_loss_hooks_are_driven_and_corrections_reach_the_next_batch(tiny_digits, tmp_path, monkeypatch):
    splits, _, _ = tiny_digits
    calls = []

    class Hooked(LOSSES["bce"]):
        def start_epoch(self, epoch):
            calls.append(("start", epoch))

        def wants_predictions(self, epoch):
            return epoch == 0

        def end_epoch(self, epoch, probs):
            calls.append(("end", epoch, tuple(probs.shape), bool(((probs >= 0) & (probs <= 1)).all())))

        def forward(self, logits, targets, indices=None):
            calls.append(("batch", indices.clone(), targets.clone()))
            return super().forward(logits, targets, indices)

        def apply_corrections(self, label_matrix):
            label_matrix[:, 3] = -1  # after the first step, class 3 is unknown everywhere

    monkeypatch.setitem(LOSSES, "bce", Hooked)
    run(job(splits, tmp_path / "run", quick(epochs=2)))
    kinds = [c[0] for c in calls]
    assert kinds[0] == "start" and calls[0][1] == 0
    assert ("end", 0, (len(splits["train"]), 10), True) in calls
    assert kinds.index("end") < [i for i, c in enumerate(calls) if c[0] == "start" and c[1] == 1][0]
    assert "end" not in kinds[kinds.index("end") + 1:]  # wants_predictions(1) is False
    batches = [c for c in calls if c[0] == "batch"]
    assert (batches[0][2][:, 3] != -1).any() and all((b[2][:, 3] == -1).all() for b in batches[1:])
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (state["labels"][:, 3] == -1).all()  # the corrected labels are part of the resume state


def run_in_process(out, extra=()):
    import subprocess
    import sys

    code = ("import sys; from mlic.cli import main; sys.argv = ['mlic'] + sys.argv[1:]; main()")
    args = [sys.executable, "-c", code, "train", "--digits-size", "96,32,32", "--img-size", "32", "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet", "--out", str(out), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_epoch_then_resume_is_the_same_run(tmp_path):
    import signal
    import time

    whole = run_in_process(tmp_path / "whole", ["--augment", "light"])
    assert whole.wait(timeout=600) == 0, whole.stdout.read()
    killed = run_in_process(tmp_path / "killed", ["--augment", "light", "--checkpoint-every", "0"])
    state_path = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a checkpoint inside the second epoch, then kill -9
        if state_path.exists():
            try:
                state = torch.load(state_path, weights_only=True)
            except Exception:  # noqa: BLE001 - replaced while we read it
                continue
            if state["next_epoch"] == 1 and state["next_step"] >= 3:
                break
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "test_metrics.json").exists()
    resumed = run_in_process(tmp_path / "killed", ["--augment", "light", "--checkpoint-every", "0", "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "inside epoch 2" in output
    assert (tmp_path / "killed" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors") \
        .read_bytes()
    assert json.loads((tmp_path / "killed" / "test_metrics.json").read_text()) == \
        json.loads((tmp_path / "whole" / "test_metrics.json").read_text())
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    killed_log = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(whole_log, killed_log, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_mAP"] == b["val_mAP"]


def test_resume_refuses_other_settings(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    run(job(splits, tmp_path / "run", quick(epochs=1)))
    with pytest.raises(TrainingError, match="--resume needs the run's own settings, but epochs was 1, now 3"):
        run(job(splits, tmp_path / "run", quick(epochs=3), resume=True))


def test_wrong_class_count_is_one_clear_error(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    with pytest.raises(TrainingError, match="11 outputs but the data has 10 classes"):
        fit(job(splits, tmp_path, model=ModelConfig(num_classes=11, img_size=32)))


class Diverged(torch.nn.Module):
    def forward(self, logits, targets, indices=None):
        return (logits * float("nan")).sum()


def test_non_finite_loss_names_epoch_and_step(tiny_digits, tmp_path, monkeypatch):
    import warnings

    monkeypatch.setitem(LOSSES, "bce", Diverged)
    splits, _, _ = tiny_digits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "classes have no positive target" on the way
        with pytest.raises(TrainingError) as err:
            fit(job(splits, tmp_path / "run", quick(batch_size=8)))
    message = str(err.value)
    assert "epoch 1, steps 1-10" in message and "--lr" in message and "--amp off" in message


def test_diverged_weights_are_an_error_not_a_warning(tiny_digits, tmp_path, monkeypatch):
    import warnings

    import mlic.engine.loop as engine

    real_update = engine.EMA.update

    def poison(self, model):  # weights turn NaN after a finite step, as an overflow would leave them
        real_update(self, model)
        with torch.no_grad():
            for p in self.module.parameters():
                p.fill_(float("nan"))

    monkeypatch.setattr(engine.EMA, "update", poison)
    splits, _, _ = tiny_digits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TrainingError, match="after epoch 1: the model's scores are not finite .* --lr"):
            fit(job(splits, tmp_path / "run", quick(ema=0.9)))


def test_ema_tracks_weights():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.module.weight.clone()
    for _ in range(50):
        ema.update(model)
    assert not torch.equal(before, ema.module.weight)
    torch.testing.assert_close(ema.module.weight, model.weight)


def test_role_fine_tunes_with_its_estimator(tiny_digits, tmp_path):
    from mlic.data.observe import single_positive

    splits, _, _ = tiny_digits
    observed = single_positive(np.asarray(splits["train"].targets), 0)
    tr = splits["train"].with_observed(observed)
    result = run(job(splits, tmp_path / "run", quick(epochs=1, loss="role"), train=tr))
    assert np.isfinite(result.history[0]["train_loss"])
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    table = state["loss"]["estimator.logits"]
    assert table.shape == (len(tr), 10)
    # observed positives start at logit(0.995) and the estimator moved during training
    assert (table[torch.from_numpy(observed == 1)] > 3).float().mean() > 0.9
    assert len(state["optimizer"]["param_groups"]) == 3


def test_linear_init_starts_fine_tuning_from_the_head_and_the_estimated_labels(tiny_digits, tmp_path):
    from safetensors.torch import load_file

    from mlic.data.observe import single_positive

    splits, _, _ = tiny_digits
    tr = splits["train"].with_observed(single_positive(np.asarray(splits["train"].targets), 0))
    lines = []
    result = run(job(splits, tmp_path / "run", quick(epochs=1, loss="role", lr=1e-5), train=tr, mode="linear-init",
                     linear=TrainConfig.linear_defaults(loss="role", epochs=3, batch_size=16, lr=1e-3),
                     test=splits["test"], log=lines.append))
    assert any("phase 1 of 2" in line for line in lines) and any("init: model weights and loss state" in line
                                                                 for line in lines)
    linear_loss = load_file(str(tmp_path / "run" / "linear" / "loss.safetensors"))["estimator.logits"]
    estimated = np.load(tmp_path / "run" / "linear" / "estimated_labels.npy")
    torch.testing.assert_close(torch.sigmoid(linear_loss), torch.from_numpy(estimated))
    # fine-tuning at lr 1e-5 for one epoch barely moves the estimator away from where the linear phase left it
    tuned = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["loss"]["estimator.logits"]
    assert (tuned - linear_loss).abs().max() < 0.05
    assert result.test_metrics is not None and (tmp_path / "run" / "test_metrics.json").exists()


def test_trains_from_shards_reading_every_row_once_per_epoch(tiny_digits, digit_shards, tmp_path, monkeypatch):
    from mlic.data.splits import training_splits
    from mlic.engine.evaluate import score_sharded, scoring_data

    splits, _, _ = tiny_digits
    shards = digit_shards(tmp_path)
    said = []
    streamed = training_splits(shards, echo=said.append)
    assert sorted(streamed.shards) == ["test", "train", "val"] and "streaming train (" in said[0]
    seen = spy_batches(monkeypatch, "bce")
    result = run(TrainJob(ModelConfig(num_classes=10, img_size=32), quick(epochs=2), streamed, tmp_path / "run",
                          progress=False, log=lambda *a, **k: None))
    rows = torch.cat([i for i, _ in seen]).tolist()
    assert len(rows) == 2 * 160 and sorted(rows[:160]) == list(range(160)) == sorted(rows[160:])
    assert rows[:160] != rows[160:]  # each epoch its own shuffle
    assert result.test_metrics["mAP"] > 20 and len(result.history) == 2
    # validation from shards scores exactly what validation from the files scores
    model, _ = load_model(tmp_path / "run")
    from mlic.data.images import build_transform

    transform = build_transform(32, False)
    files = Splits(splits["train"], splits["val"], splits["test"])
    args = (16, 0, model.config.mean, model.config.std, torch.device("cpu"), None)
    from_shards, rows_s = score_sharded(model, scoring_data("val", streamed, transform), *args)
    from_files, rows_f = score_sharded(model, scoring_data("val", files, transform), *args)
    np.testing.assert_array_equal(rows_s, rows_f)
    np.testing.assert_array_equal(from_shards, from_files)
    assert result.best_val_map == pytest.approx(evaluate_scores(from_files, splits["val"].targets)["mAP"], abs=1e-4)


def test_shards_refuse_what_they_cannot_do(digit_shards, tmp_path):
    import shutil

    from mlic.data.labelset import LabelSetError
    from mlic.data.splits import training_splits

    shards = digit_shards(tmp_path)
    streamed = training_splits(shards, echo=lambda *a: None)
    with pytest.raises(TrainingError, match="gets no full batch of 150 from its shards; lower --batch-size"):
        run(TrainJob(ModelConfig(num_classes=10, img_size=32), quick(batch_size=150, workers=2), streamed,
                     tmp_path / "big", progress=False, log=lambda *a, **k: None))
    shutil.rmtree(shards / "val")
    shutil.rmtree(shards / "test")
    with pytest.raises(LabelSetError, match="shards need their own val/ split"):
        training_splits(shards, echo=lambda *a: None)
