import json

import numpy as np
import pytest
import torch

from mlic.config import ModelConfig, TrainConfig
from mlic.engine.checkpoint import load_model
from mlic.engine.train import EMA, TrainingError, train


def quick(**kw):
    base = dict(epochs=2, batch_size=32, lr=3e-3, workers=0, hflip=False, seed=0)
    return TrainConfig(**(base | kw))


def test_trains_checkpoints_and_evaluates(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    cfg = ModelConfig(num_classes=10, img_size=32)
    result = train(cfg, quick(ema=0.9), splits["train"], splits["val"], tmp_path / "run", test_set=splits["test"],
                   progress=False, log=lambda *a: None)
    assert result.best_epoch >= 1 and len(result.history) == 2
    assert 0 <= result.test_metrics["mAP"] <= 100
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    model, meta = load_model(tmp_path / "run")
    assert meta["classes"] == splits["train"].classes and len(meta["thresholds"]) == 10
    assert meta["train"]["ema"] == 0.9


def test_resume_continues_after_a_crash(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    cfg = ModelConfig(num_classes=10, img_size=32)
    out = tmp_path / "run"

    def crash_after_first_epoch(line):
        if line.startswith("epoch   1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, quick(), splits["train"], splits["val"], out, progress=False, log=crash_after_first_epoch)
    first = json.loads((out / "metrics.jsonl").read_text())
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    lines = []
    result = train(cfg, quick(), splits["train"], splits["val"], out, resume=True, progress=False, log=lines.append)
    assert any("resumed" in line for line in lines)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[0] == first
    with pytest.raises(TrainingError, match="--resume needs the run's own settings, but epochs was 2, now 3"):
        train(cfg, quick(epochs=3), splits["train"], splits["val"], out, resume=True, progress=False)


def test_observed_labels_and_partial_loss_train(tiny_digits, tmp_path):
    from mlic.data.observe import single_positive

    splits, _, _ = tiny_digits
    tr = splits["train"].with_observed(single_positive(np.asarray(splits["train"].targets), 0))
    result = train(ModelConfig(num_classes=10, img_size=32), quick(epochs=1, loss="bce"), tr, splits["val"],
                   tmp_path / "run", progress=False, log=lambda *a: None)
    assert np.isfinite(result.history[0]["train_loss"])


def test_wrong_class_count_is_one_clear_error(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    with pytest.raises(TrainingError, match="11 outputs but the data has 10 classes"):
        train(ModelConfig(num_classes=11, img_size=32), quick(), splits["train"], splits["val"], tmp_path)


class NaNLoss(torch.nn.Module):
    def forward(self, logits, targets, indices=None):
        return logits.sum() * float("nan")


def test_non_finite_loss_stops_with_advice(tiny_digits, tmp_path, monkeypatch):
    splits, _, _ = tiny_digits
    monkeypatch.setattr("mlic.engine.train.build_loss", lambda name, **kw: NaNLoss())
    with pytest.raises(TrainingError, match="not finite for 10 steps"):
        train(ModelConfig(num_classes=10, img_size=32), quick(batch_size=8), splits["train"],
              splits["val"], tmp_path, progress=False, log=lambda *a: None)


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
    result = train(ModelConfig(num_classes=10, img_size=32), quick(epochs=1, loss="role"), tr, splits["val"],
                   tmp_path / "run", progress=False, log=lambda *a: None)
    assert np.isfinite(result.history[0]["train_loss"])
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    table = state["loss"]["estimator.logits"]
    assert table.shape == (len(tr), 10)
    # observed positives start at logit(0.995) and the estimator moved during training
    assert (table[torch.from_numpy(observed == 1)] > 3).float().mean() > 0.9
    assert len(state["optimizer"]["param_groups"]) == 3


def test_non_finite_loss_names_epoch_and_step(tiny_digits, tmp_path, monkeypatch):
    import warnings

    import mlic.engine.train as engine

    class Diverged(torch.nn.Module):
        def forward(self, logits, targets, indices=None):
            return (logits * float("nan")).sum()

    monkeypatch.setattr(engine, "build_loss", lambda name, **kw: Diverged())
    splits, _, _ = tiny_digits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "classes have no positive target" on the way
        with pytest.raises(TrainingError) as err:
            train(ModelConfig(num_classes=10, img_size=32), quick(batch_size=8), splits["train"], splits["val"],
                  tmp_path / "run", progress=False, log=lambda *a: None)
    message = str(err.value)
    assert "epoch 1, steps 1-10" in message and "--lr" in message and "--amp off" in message


def test_diverged_weights_are_an_error_not_a_warning(tiny_digits, tmp_path, monkeypatch):
    import warnings

    import mlic.engine.train as engine

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
            train(ModelConfig(num_classes=10, img_size=32), quick(ema=0.9), splits["train"], splits["val"],
                  tmp_path / "run", progress=False, log=lambda *a: None)
