"""Prediction files as a careless or hostile user meets them: odd names, crashes, resumes with another model,
outputs aimed at the command's own inputs."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mlic.cli import app
from mlic.config import ModelConfig
from mlic.engine.checkpoint import save_model
from mlic.engine.predict import Prediction
from mlic.engine.results import ResultWriter, model_identity
from mlic.models.classifier import build_model
from mlic.outputs import OutputError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, fragment):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = ModelConfig(num_classes=3, img_size=32)
        save_model(root / f"run{seed}", build_model(config), config, ["x", "y", "z"])
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "line\nbreak.png", "caf\u00e9.png"):
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(images / name)
    raw = os.fsencode(images) + b"/bad\xffname.png"  # not valid UTF-8
    with open(raw, "wb") as f:
        f.write((images / "a.png").read_bytes())
    return root


def rows_of(path):
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8", "surrogateescape"), newline="")))


def test_odd_names_are_written_once_and_resume_to_the_same_rows(models, tmp_path):
    out_csv, out_jsonl = tmp_path / "p.csv", tmp_path / "p.jsonl"
    result = run("predict", models / "imgs", "--checkpoint", models / "run0", "--csv", out_csv, "--jsonl", out_jsonl,
                 "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = rows_of(out_csv)
    assert len(rows) == 1 + 5 and {len(r) for r in rows} == {5}
    names = {os.path.basename(r[0]) for r in rows[1:]}
    assert "line\nbreak.png" in names and "bad\udcffname.png" in names  # byte for byte: the name opens the file
    assert all(os.path.isfile(r[0]) for r in rows[1:])
    jsonl = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert len(jsonl) == 5 and all(os.path.isfile(r["path"]) for r in jsonl)
    before = (out_csv.read_bytes(), out_jsonl.read_bytes())
    result = run("predict", models / "imgs", "--checkpoint", models / "run0", "--csv", out_csv, "--jsonl", out_jsonl,
                 "--workers", "0", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming: 5 of 5 images already written" in result.output
    assert (out_csv.read_bytes(), out_jsonl.read_bytes()) == before
    printed = run("predict", models / "imgs", "--checkpoint", models / "run0", "--workers", "0")
    assert printed.exit_code == 0 and len(printed.stdout.splitlines()) == 5  # a newline in a name stays one line
    assert "line\\nbreak.png" in printed.stdout and "bad\\xffname.png" in printed.stdout


def test_a_record_cut_by_a_crash_is_dropped_and_rewritten(models, tmp_path):
    out = tmp_path / "p.csv"
    result = run("predict", models / "imgs", "--checkpoint", models / "run0", "--csv", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    full = out.read_bytes()
    cut = full.index(b"line\nbreak") + 6  # a crash in the middle of the quoted path with a newline
    out.write_bytes(full[:cut])
    result = run("predict", models / "imgs", "--checkpoint", models / "run0", "--csv", out, "--workers", "0",
                 "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(rows_of(out)[1:]) == sorted(rows_of_bytes(full)[1:])


def rows_of_bytes(data):
    return list(csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="")))


def test_resume_with_another_model_or_rule_is_refused(models, tmp_path):
    out = tmp_path / "p.jsonl"
    assert run("predict", models / "imgs" / "a.png", "--checkpoint", models / "run0", "--jsonl", out,
               "--workers", "0").exit_code == 0
    before = out.read_bytes()
    error_line(run("predict", models / "imgs", "--checkpoint", models / "run1", "--jsonl", out, "--resume"),
               "holds predictions of another model")
    error_line(run("predict", models / "imgs", "--checkpoint", models / "run0", "--jsonl", out, "--resume",
                   "--threshold", "0.2"), "holds predictions of another model")
    assert out.read_bytes() == before


def test_relative_and_absolute_spellings_are_one_row(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models)
    out = tmp_path / "p.csv"
    result = run("predict", "imgs/a.png", models / "imgs" / "a.png", "./imgs/../imgs/a.png", "--checkpoint",
                 models / "run0", "--csv", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert len(rows_of(out)) == 2 and "each image is predicted once" in result.output
    result = run("predict", models / "imgs" / "a.png", "imgs/b.png", "--checkpoint", models / "run0", "--csv", out,
                 "--workers", "0", "--resume")
    assert result.exit_code == 0 and "resuming: 1 of 2" in result.output
    assert len(rows_of(out)) == 3


def test_outputs_aimed_at_inputs_or_each_other_are_refused(models, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes((models / "imgs" / "a.png").read_bytes())
    meta = (models / "run0" / "model.json").read_bytes()
    for option, target, fragment in (
            ("--csv", models / "run0" / "model.json", "is an input of this command"),
            ("--jsonl", image, "is an input of this command")):
        error_line(run("predict", image, "--checkpoint", models / "run0", option, target, "--overwrite"), fragment)
    error_line(run("predict", image, "--checkpoint", models / "run0", "--jsonl", tmp_path / "x",
                   "--csv", tmp_path / "x"), "--jsonl and --csv name the same file")
    table = tmp_path / "labels.csv"
    table.write_text("path,labels\na.png,cat\n")
    error_line(run("predict", image, "--checkpoint", models / "run0", "--csv", table, "--resume"),
               "is not a CSV written by mlic predict")
    error_line(run("predict", image, "--checkpoint", models / "run0", "--csv", table), "--overwrite to replace it")
    assert table.read_text() == "path,labels\na.png,cat\n" and image.read_bytes() == \
        (models / "imgs" / "a.png").read_bytes() and (models / "run0" / "model.json").read_bytes() == meta


def test_writer_holds_its_file_alone(models, tmp_path):
    writer = ResultWriter(["x", "y", "z"], csv_path=tmp_path / "p.csv", identity="m")
    try:
        with pytest.raises(OutputError, match="another mlic predict is writing it"):
            ResultWriter(["x", "y", "z"], csv_path=tmp_path / "p.csv", identity="m", resume=True)
        writer.write([Prediction("q.png", np.array([0.1, 0.2, 0.3]), [])])
    finally:
        writer.close()
    assert model_identity([models / "run0" / "model.safetensors"], ["x"], [0.5], None, None) != \
        model_identity([models / "run1" / "model.safetensors"], ["x"], [0.5], None, None)


def test_a_fifo_and_an_unreadable_folder_neither_hang_nor_vanish(models, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    (folder / "a.png").write_bytes((models / "imgs" / "a.png").read_bytes())
    os.mkfifo(folder / "pipe.jpg")
    code = ("import sys; from mlic.cli import app; sys.argv = ['mlic', 'predict', sys.argv[1], '--checkpoint', "
            "sys.argv[2], '--workers', '0']; app()")
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(models / "run0")], capture_output=True,
                          text=True, timeout=120)  # a FIFO read would block forever
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and "a.png" in done.stdout, done
    error_line(run("predict", folder / "pipe.jpg", "--checkpoint", models / "run0"), "not a regular file")

    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests run as root, who may read all)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = run("predict", folder, "--checkpoint", models / "run0", "--workers", "0", "--csv", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    assert f"{folder / 'locked'}: cannot list this folder" in result.output
    assert "1 folders not listable" in result.output


def test_explain_gives_each_image_its_own_map_and_keeps_foreign_files(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(head="query2label", num_classes=3, img_size=32,
                         head_args={"hidden_dim": 16, "dim_feedforward": 32, "nheads": 2})
    save_model(tmp_path / "q2l", build_model(config), config, ["x", "y", "z"])
    rng = np.random.default_rng(1)
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "in" / sub / "x.png")
    maps = tmp_path / "maps"
    args = ["predict", tmp_path / "in", "--checkpoint", tmp_path / "q2l", "--workers", "0", "--explain", maps]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in maps.iterdir()) == ["a__x_attention.png", "b__x_attention.png"]
    assert run(*args).exit_code == 0  # its own maps are replaced
    (maps / "a__x_attention.png").write_bytes(b"the user's own picture")
    error_line(run(*args), "is not an attention map written by mlic")
    assert (maps / "a__x_attention.png").read_bytes() == b"the user's own picture"


def test_a_fifo_in_a_path_list_is_an_error_not_a_hang(models, tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "list.txt").write_text("pipe.jpg\n" + str(models / "imgs" / "a.png") + "\n")
    code = ("import sys; from mlic.cli import app; sys.argv = ['mlic', 'predict', '--list', sys.argv[1], "
            "'--checkpoint', sys.argv[2], '--workers', '0']; app()")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "list.txt"), str(models / "run0")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "a.png" in done.stdout, done
    assert "pipe.jpg: not a regular file" in done.stderr
