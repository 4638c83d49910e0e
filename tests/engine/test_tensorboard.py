"""``mlic train --log tensorboard``: event files in the run folder that TensorBoard reads back."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from mlic.cli import app

pytest.importorskip("tensorboard")
runner = CliRunner()
TINY = ["--digits-size", "64,32,32", "--img-size", "32", "--workers", "0", "--threads", "1", "--quiet"]


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_train_log_tensorboard_writes_val_map_per_epoch(tmp_path, mode):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--mode", mode, "--epochs", "2", "--out", str(out),
                                 "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert list(out.glob("events.out.tfevents.*"))
    curves = scalars(out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in curves["val/mAP"]] == [1, 2]
    assert [v for _, v in curves["val/mAP"]] == pytest.approx([r["val_mAP"] for r in history])
    assert [v for _, v in curves["train/loss"]] == pytest.approx([r["train_loss"] for r in history])
    assert len(curves["train/lr"]) == 2
    test_map = json.loads((out / "test_metrics.json").read_text())["mAP"]
    assert curves["test/mAP"][0][1] == pytest.approx(test_map)


def test_no_log_no_event_files(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--mode", "linear", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("events.out.tfevents.*"))


def test_unknown_log_target_is_one_line(tmp_path):
    result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "run"), "--log", "wandb"])
    assert result.exit_code == 2
    assert "--log 'wandb': choose tensorboard" in result.output
    assert not (tmp_path / "run").exists()  # refused before the run folder is claimed


def test_missing_tensorboard_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as when it is not installed
    result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "run"), "--log", "tensorboard"])
    assert result.exit_code == 2
    assert "pip install -e '.[tensorboard]'" in result.output
    assert len(result.output.strip().splitlines()) == 1
