"""What keeps a user's data and results safe: real-sized photos never skipped, bad data never silent,
nothing overwritten by surprise, every refusal one line a user can act on."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mlic.cli import app, format_metrics

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, *fragments: str) -> str:
    """The single 'error:' line of a failed command, checked for exit code 2, no traceback, and each fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def photo(w: int, h: int, seed: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, rng.integers(0, 255))], -1)
    return Image.fromarray((base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A CSV data set of real-sized JPEGs (COCO's 640x427 and 640x480, landscape and portrait, progressive)."""
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(16):
        w, h = [(640, 427), (640, 480), (480, 640), (427, 640)][i % 4]
        photo(w, h, i).save(root / f"{i:02d}.jpg", quality=88, progressive=i % 3 == 0)
        rows.append(f"{i:02d}.jpg,{'cat' if i % 2 else 'dog'}{'|sky' if i % 3 else ''}")
    (root / "train.csv").write_text("path,labels\n" + "\n".join(rows[:10]) + "\n")
    (root / "val.csv").write_text("path,labels\n" + "\n".join(rows[10:13]) + "\n")
    (root / "test.csv").write_text("path,labels\n" + "\n".join(rows[13:]) + "\n")
    data = root / "prepared"
    result = run("prepare", "table", "--root", root / "train.csv", "--out", data,
                 "--option", f"val={root / 'val.csv'}", "--option", f"test={root / 'test.csv'}")
    assert result.exit_code == 0, result.output
    return root, data


def test_train_and_eval_at_448_skip_no_real_photo(photos, tmp_path):
    _, data = photos
    out = tmp_path / "run448"
    result = run("train", "--data", data, "--img-size", 448, "--epochs", 1, "--batch-size", 4, "--workers", 0,
                 "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.output and "unreadable" not in result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["bad_images"] == 0 and record["val_bad_images"] == 0
    assert json.loads((out / "test_metrics.json").read_text())["unreadable_images"] == 0
    assert "test (3 images)" in result.output
    result = run("eval", "--checkpoint", out, "--data", data, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "on 3 images" in result.output and "skipped" not in result.output


@pytest.fixture
def broken_data(tmp_path):
    """Eight images of which ``bad`` are corrupt, as a prepared folder with train/ val/ test/."""
    def make(bad: int):
        root = tmp_path / f"broken{bad}"
        root.mkdir()
        rows = []
        for i in range(8):
            if i < bad:
                (root / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken" * 10)
            else:
                photo(48, 40, i).save(root / f"{i}.jpg")
            rows.append(f"{i}.jpg,{'a' if i % 2 else 'b'}")
        table = "path,labels\n" + "\n".join(rows) + "\n"
        for split in ("train", "val", "test"):
            (root / f"{split}.csv").write_text(table)
        result = run("prepare", "table", "--root", root / "train.csv", "--out", root / "data",
                     "--option", f"val={root / 'val.csv'}", "--option", f"test={root / 'test.csv'}")
        assert result.exit_code == 0, result.output
        return root / "data"
    return make


def test_too_many_unreadable_images_stop_the_run(broken_data, tmp_path):
    data = broken_data(2)
    args = ("train", "--data", data, "--img-size", 32, "--epochs", 1, "--batch-size", 4, "--workers", 0, "--quiet")
    one_error_line(run(*args, "--out", tmp_path / "a"), "train: more than 0 of 8 images are unreadable",
                   "--max-bad-images 1%", "broken2/", ".jpg: cannot decode image")
    result = run(*args, "--out", tmp_path / "b", "--max-bad-images", 2)  # the count form
    assert result.exit_code == 0, result.output
    assert "epoch 1: train: skipped 2 unreadable images" in result.output
    assert "epoch 1: val: skipped 2 unreadable images" in result.output
    assert "test (6 images, 2 unreadable skipped)" in result.output
    record = json.loads((tmp_path / "b" / "metrics.jsonl").read_text())
    assert record["bad_images"] == 2 and record["val_bad_images"] == 2
    assert json.loads((tmp_path / "b" / "test_metrics.json").read_text())["unreadable_images"] == 2
    one_error_line(run("eval", "--checkpoint", tmp_path / "b", "--data", data, "--workers", 0),
                   "test: more than 0 of 8 images are unreadable")
    result = run("eval", "--checkpoint", tmp_path / "b", "--data", data, "--workers", 0, "--max-bad-images", "25%")
    assert result.exit_code == 0 and "on 6 images (2 unreadable skipped)" in result.output


def test_a_split_with_no_readable_image_is_an_error(broken_data, tmp_path):
    data = broken_data(8)
    one_error_line(run("train", "--data", data, "--img-size", 32, "--epochs", 1, "--workers", 0, "--quiet",
                       "--max-bad-images", 100, "--out", tmp_path / "r"), "train: none of its 8 images could be read")


def test_strict_images_with_workers_is_one_line(broken_data, tmp_path):
    data = broken_data(1)
    line = one_error_line(run("train", "--data", data, "--img-size", 32, "--epochs", 1, "--workers", 2, "--quiet",
                              "--strict-images", "--out", tmp_path / "r"), "0.jpg", "--strict-images")
    assert "DataLoader worker" not in line and "Caught" not in line


@pytest.mark.parametrize("args, fragments", [
    (["--epochs", "0"], ["--epochs 0", "at least 1 epoch"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--lr", "-1"], ["--lr -1", "positive"]),
    (["--ema", "1.5"], ["--ema 1.5"]),
    (["--img-size", "0"], ["--img-size 0", "from 16 to 4096"]),
    (["--amp", "fast"], ["--amp 'fast'", "auto, bf16, fp16, off"]),
    (["--max-bad-images", "lots"], ["--max-bad-images 'lots'", "1%"]),
    (["--val-fraction", "1.5"], ["--val-fraction 1.5"]),
    (["--mode", "linear", "--ema", "0.9"], ["--ema", "not used by --mode linear"]),
])
def test_impossible_settings_are_refused_up_front(args, fragments, tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "never-built"))
    one_error_line(run("train", *args, "--out", tmp_path / "r"), *fragments)
    assert not (tmp_path / "never-built").exists()  # refused before any data was built


def test_unknown_head_and_loss_settings_list_the_valid_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    args = ("train", "--digits-size", "20,8,8", "--img-size", 32, "--epochs", 1, "--workers", 0, "--quiet")
    one_error_line(run(*args, "--head", "query2label", "--head-arg", "hiden_dim=8", "--out", tmp_path / "a"),
                   "--head-arg hiden_dim", "valid keys: hidden_dim")
    one_error_line(run(*args, "--loss", "asl", "--loss-arg", "gama_neg=2", "--out", tmp_path / "b"),
                   "--loss-arg gama_neg", "valid keys: gamma_neg")


def test_help_shows_every_default():
    text = re.sub(r"\s+", " ", run("train", "--help").output)
    for fragment in ("Epochs (default 12", "Batch size per process (default 64", "(default 0.002",
                     "Seed of initialisation and data order (default 0)",
                     "worker processes (default: chosen from the core",
                     "[default: 1%]"):
        assert fragment in text, fragment


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    args = ["train", "--digits-size", "32,16,16", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
            "--workers", "0", "--quiet", "--out", str(tmp_path / "run")]
    result = run(*args)
    assert result.exit_code == 0, result.output
    return tmp_path / "run", args, result.output


def test_a_run_is_never_overwritten_by_surprise(tiny_run):
    out, args, _ = tiny_run
    before = (out / "model.safetensors").read_bytes()
    one_error_line(run(*args), f"{out}: holds a run already", "--resume", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    (out / "features").mkdir()  # a user's folder under a name a linear run would write: not the run's
    (out / "features" / "mine.npy").write_bytes(b"user data")
    one_error_line(run(*args, "--overwrite"), f"{out}: holds features/, not written by a run of mlic")
    assert (out / "features" / "mine.npy").read_bytes() == b"user data"
    (out / "features").rename(out / "my_features")
    result = run(*args, "--overwrite", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() != before and (out / "notes.txt").read_text() == "mine"
    assert (out / "my_features" / "mine.npy").read_bytes() == b"user data"


def test_overwrite_removes_what_the_old_run_wrote(tiny_run):
    out, args, _ = tiny_run
    result = run(*args, "--overwrite", "--loss", "role", "--observe", "single-positive")
    assert result.exit_code == 0, result.output
    assert (out / "loss.safetensors").is_file()  # ROLE's estimated labels, recorded in the run's manifest
    manifest = json.loads((out / ".mlic-run.json").read_text())["files"]
    assert "loss.safetensors" in manifest and "features" not in manifest
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "loss.safetensors").exists()  # bce keeps no state: the old run's must not survive
    (out / "loss.safetensors").write_bytes(b"a file no run recorded")  # a user's, under a run's name
    one_error_line(run(*args, "--overwrite"), "holds loss.safetensors, not written by a run of mlic")
    assert (out / "loss.safetensors").read_bytes() == b"a file no run recorded"


def test_resume_names_each_setting_that_differs(tiny_run):
    out, args, _ = tiny_run
    line = one_error_line(run(*args, "--resume", "--lr", "0.01", "--loss", "asl"), "--resume needs the run's own")
    assert "lr was 0.004, now 0.01" in line and "loss was 'bce', now 'asl'" in line


def test_outputs_line_lists_what_is_there_and_files_get_the_umask(tiny_run):
    out, _, output = tiny_run
    line = next(line for line in output.splitlines() if line.startswith("outputs:"))
    listed = re.search(r"\((.*)\)", line).group(1).split(", ")
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.json", "model.safetensors", "metrics.jsonl", "test_metrics.json", "last.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_interrupt_names_the_run_folder(tmp_path, monkeypatch):
    import mlic.engine.run as engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run", interrupted)
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    result = run("train", "--digits-size", "20,8,8", "--img-size", 32, "--out", tmp_path / "myrun", "--quiet")
    assert result.exit_code == 130
    assert f"mlic train --resume --out {tmp_path / 'myrun'}" in result.output


def test_file_system_errors_are_one_line(tmp_path, monkeypatch, tiny_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    one_error_line(run("train", "--digits-size", "20,8,8", "--out", blocker / "run"), f"{blocker / 'run'}",
                   "--out must be a writable folder")
    monkeypatch.setenv("MLIC_CACHE", str(blocker / "cache"))
    one_error_line(run("train", "--digits-size", "20,8,9", "--out", tmp_path / "r2"), "MLIC_CACHE")
    out, _, _ = tiny_run
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    one_error_line(run("eval", "--checkpoint", out, "--workers", 0, "--json", blocker / "m.json"), str(blocker))


def test_metrics_table_fits_80_columns_without_cutting():
    classes = ["person", "traffic light", "fire hydrant", "baseball glove", "tennis racket", "potted plant",
               "dining table", "teddy bear", "a-very-long-class-name-that-goes-on-and-on-and-on-for-ever"]
    metrics = {"mAP": 84.91, "mAP_voc": 85.02, "CP": 100.0, "CR": 77.77, "CF1": 80.0, "OP": 88.8, "OR": 66.6,
               "OF1": 76.1, "CF1_top3": 70.2, "OF1_top3": 73.3, "per_class_ap": np.linspace(10, 100, len(classes))}
    text = format_metrics(metrics, classes, "test (5000 images)")
    assert max(len(line) for line in text.splitlines()) <= 80
    for key in ("mAP_voc", "CF1_top3", "OF1_top3", "84.91", "100.00", "dining table", "teddy bear"):
        assert key in text
