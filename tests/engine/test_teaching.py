"""Teachers in the engine: the cached pass (pl_all handed to the loss, resumed), the per-step schedule, the
teacher kept out of the student's files, ``mlic pseudo-label`` and its data used by training, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlic.config import ModelConfig, TrainConfig
from mlic.data.splits import Splits
from mlic.engine.job import TrainJob
from mlic.engine.run import run
from mlic.engine.teaching import TeacherSetup, setup_teaching, teacher_pass
from mlic.errors import MlicError
from mlic.losses import LOSSES, build_loss

pytest.importorskip("open_clip", reason="the CLIP teacher needs open_clip (pip install 'mlic[clip]')")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A small random CLIP (ViT, 32 px, patch 16; text tower 1 layer) in OpenAI layout, saved as a state dict."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(64, CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=True)
    path = tmp_path_factory.mktemp("teacher") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


def quick(**kw) -> TrainConfig:
    return TrainConfig(**(dict(epochs=1, batch_size=32, lr=3e-3, workers=0, hflip=False, seed=0) | kw))


def single_positive(ls):
    from mlic.data.observe import observe

    return ls.with_observed(observe(np.asarray(ls.targets), "single-positive", 1200))


def make(splits, out, loss="vlpl", loss_args=None, **kw) -> TrainJob:
    return TrainJob(ModelConfig(num_classes=10, img_size=32), quick(loss=loss, loss_args=loss_args or {}),
                    Splits(single_positive(splits["train"]), splits["val"], None), out, progress=False,
                    log=lambda *a, **k: None, **kw)


def test_cached_pass_gives_the_loss_pl_all_and_resumes(tiny_digits, clip_file, tmp_path, monkeypatch):
    splits, _, _ = tiny_digits
    args = {"rule": "vlpl", "temperature": 0.01, "threshold": 0.3}
    job = make(splits, tmp_path / "run", teacher=str(clip_file), teacher_args=args)
    seen = []
    real = LOSSES["vlpl"].set_pseudo_labels
    monkeypatch.setattr(LOSSES["vlpl"], "set_pseudo_labels", lambda self, pl: (seen.append(pl.clone()),
                                                                                real(self, pl))[1])
    run(job)
    assert len(seen) == 1 and seen[0].shape == (len(job.splits.train), 10) and seen[0].dtype == torch.int8
    # the same numbers as a pass of the teacher by hand
    setup = TeacherSetup(str(clip_file), args, job.splits.train.classes, "vlpl", torch.device("cpu"), 32,
                         job.model.mean, job.model.std)
    _, pl, _ = teacher_pass(setup, job.splits.train, job.splits.train.train_targets)
    assert torch.equal(pl, seen[0]) and (pl == 1).any()
    # the teacher is not in the student's files; the pseudo-labels are in the resume state
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert not any("visual" in k or "text" in k or "teacher" in k for k in f.keys())
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert torch.equal(state["steps"]["loss"]["pseudo_labels"] if "steps" in state else
                       state["loss"]["pseudo_labels"], pl)


def test_per_step_schedule(tiny_digits, clip_file, tmp_path, monkeypatch):
    splits, _, _ = tiny_digits
    calls = []
    real = TeacherSetup.step
    monkeypatch.setattr(TeacherSetup, "step", lambda self, *a: (calls.append(len(a[3])), real(self, *a))[1])
    job = make(splits, tmp_path / "run", loss="aevlp", loss_args={"num_epochs": 1},
               teacher=str(clip_file), teacher_cache=False,
               teacher_args={"rule": "aevlp", "grid_size": 2, "threshold": 0.2, "eta": 0.1})
    run(job)
    assert len(calls) >= 4 and sum(calls) >= len(job.splits.train) - 32


def test_loss_needs_teacher(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    job = make(splits, tmp_path / "run")
    with pytest.raises(MlicError, match="--loss vlpl needs pseudo-labels from a teacher: add --teacher") as err:
        setup_teaching(job, job.splits.train, build_loss("vlpl"), torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_bad_teacher_args(tiny_digits, clip_file, tmp_path):
    splits, _, _ = tiny_digits
    job = make(splits, tmp_path / "run", teacher=str(clip_file), teacher_args={"bogus": 1})
    with pytest.raises(MlicError, match="--teacher-arg bogus: not a teacher setting"):
        setup_teaching(job, job.splits.train, build_loss("vlpl"), torch.device("cpu"))
    job = make(splits, tmp_path / "run", teacher=str(tmp_path / "absent.pt"))
    with pytest.raises(MlicError, match="absent.pt"):
        setup_teaching(job, job.splits.train, build_loss("vlpl"), torch.device("cpu"))
    job = make(splits, tmp_path / "run", loss="an", teacher=str(clip_file), teacher_cache=False)
    with pytest.raises(MlicError, match="--no-teacher-cache"):
        setup_teaching(job, job.splits.train, build_loss("an"), torch.device("cpu"))


def test_pseudo_label_command_and_training_on_its_data(tiny_digits, clip_file, tmp_path):
    from typer.testing import CliRunner

    from mlic.cli import app

    splits, _, _ = tiny_digits
    data = tmp_path / "D"
    single_positive(splits["train"]).save(data / "train")
    splits["val"].save(data / "val")
    splits["test"].save(data / "test")
    result = CliRunner().invoke(app, ["pseudo-label", "--data", str(data), "--teacher", str(clip_file),
                                      "--rule", "aevlp", "--out", str(tmp_path / "D_pl"), "--workers", "0",
                                      "--quiet", "--teacher-arg", "grid_size=2", "--teacher-arg", "threshold=0.2",
                                      "--teacher-arg", "eta=0.1"])
    assert result.exit_code == 0, result.output
    assert "pseudo-positives" in result.output and "precision" in result.output
    pl = np.load(tmp_path / "D_pl" / "train" / "pseudo_labels.npy")
    sims = np.load(tmp_path / "D_pl" / "train" / "teacher_sims.npy")
    assert pl.shape == (160, 10) and sims.shape == (160, 5, 10) and (pl == 1).any()
    # any loss: pseudo-positives become extra positives on unknown entries
    from mlic.data.splits import training_splits

    found = training_splits(tmp_path / "D_pl", echo=lambda *a: None)
    job = TrainJob(ModelConfig(num_classes=10, img_size=32), quick(loss="an"), found, tmp_path / "r",
                   progress=False, log=lambda *a, **k: None, data=tmp_path / "D_pl")
    before = np.asarray(found.train.train_targets).copy()
    setup_teaching(job, found.train, build_loss("an"), torch.device("cpu"))
    after = np.asarray(found.train.train_targets)
    assert ((after == 1) & (before == -1)).sum() == ((pl == 1) & (before == -1)).sum() > 0
    # a teacher loss gets them as pseudo-labels
    loss = build_loss("aevlp")
    setup_teaching(job, found.train, loss, torch.device("cpu"))
    assert torch.equal(loss.pseudo_labels, torch.from_numpy(pl))
    # bad input: a teacher file of neither layout, one line, nothing written
    junk = tmp_path / "junk.pt"
    torch.save({"foo": torch.zeros(2)}, junk)
    result = CliRunner().invoke(app, ["pseudo-label", "--data", str(data), "--teacher", str(junk),
                                      "--out", str(tmp_path / "D_bad"), "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "neither CLIP layout" in result.output
    assert not (tmp_path / "D_bad").exists()
    # --out is replaced as a whole: a user's folder is refused, never emptied
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["pseudo-label", "--data", str(data), "--teacher", str(clip_file),
                                      "--out", str(tmp_path / "mine"), "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "not only prepared splits" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_options_checked_before_any_work(tmp_path, clip_file):
    from mlic.engine.teaching import check_teacher_options

    with pytest.raises(MlicError, match="--loss vlpl needs pseudo-labels from a teacher: add --teacher"):
        check_teacher_options("vlpl", {}, None, True, None, "finetune")
    check_teacher_options("aevlp", {"use_pl": False}, None, True, None, "finetune")  # the ablation needs none
    check_teacher_options("vlpl", {}, clip_file, False, None, "finetune")
    with pytest.raises(MlicError, match="--mode linear"):
        check_teacher_options("vlpl", {}, clip_file, False, None, "linear")
    with pytest.raises(MlicError, match="--loss an cannot take"):
        check_teacher_options("an", {}, clip_file, False, None, "finetune")
    with pytest.raises(MlicError, match="no such file"):
        check_teacher_options("vlpl", {}, tmp_path / "absent.pt", True, None, "finetune")
