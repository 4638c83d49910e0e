"""The mlic command end to end on a tiny MultiDigits, and the one-line errors a user can cause."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from mlic.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    import os

    os.environ["MLIC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    result = run("train", "--digits-size", "120,40,40", "--img-size", "32", "--epochs", "2", "--batch-size", "32",
                 "--workers", "0", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_prints_table_and_writes_run(trained):
    out, output = trained
    assert "mAP" in output and "AP per class" in output and f"outputs: {out}" in output
    for name in ("model.safetensors", "model.json", "metrics.jsonl", "report.md", "test_metrics.json",
                 "training.png", "per_class_ap.png", "pr_curves.png", "last.pt"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(metrics["per_class_ap"]) == {str(d) for d in range(10)}


def test_predict_folder_json_csv(trained, tmp_path):
    out, _ = trained
    images = tmp_path / "imgs"
    images.mkdir()
    src = next(out.parent.parent.glob("cache*/multidigits-*/images/test"), None)
    assert src is not None
    for p in sorted(src.glob("*.png"))[:3]:
        shutil.copy(p, images / p.name)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    result = run("predict", images, "--checkpoint", out, "--jsonl", tmp_path / "p.jsonl", "--csv", tmp_path / "p.csv",
                 "--threshold", "0.0", "--top-k", "2", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "broken.png\terror:" in result.output and "4 images in" in result.output
    payload = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    good = [p for p in payload if not p["error"]]
    assert len(payload) == 4 and len(good) == 3 and all(len(p["labels"]) == 2 for p in good)
    assert (tmp_path / "p.csv").read_text().splitlines()[0].startswith("path,labels,0,1")
    printed = run("predict", images, "--checkpoint", out, "--top-k", "1", "--workers", "0")
    assert printed.exit_code == 0 and len(printed.output.strip().splitlines()) == 4


def test_eval_checkpoint(trained):
    out, _ = trained
    data = next(out.parent.parent.glob("cache*/multidigits-*"))
    result = run("eval", "--checkpoint", out, "--data", data, "--workers", "0", "--json", out.parent / "eval.json")
    assert result.exit_code == 0, result.output
    assert "on 40 images" in result.output
    # the same model on the same test split: the figures the run reported, recomputed from the saved files
    evaluated = json.loads((out.parent / "eval.json").read_text())
    reported = json.loads((out / "test_metrics.json").read_text())
    for key in ("mAP", "mAP_voc", "CF1", "OF1"):
        assert evaluated[key] == pytest.approx(reported[key], abs=1e-4), key
    assert f"{reported['mAP']:.2f}" in result.output


def test_eval_sparse_partial_labels_over_known_entries(trained, tmp_path):
    import warnings

    from mlic.data.labelset import LabelSet
    from mlic.metrics import metrics_table

    out, _ = trained
    test = LabelSet.load(next(out.parent.parent.glob("cache*/multidigits-*")) / "test")
    partial = np.asarray(test.targets).copy()
    partial[np.random.default_rng(0).random(partial.shape) < 0.6] = -1  # 40 % of the labels verified
    partial[:, 9] = np.where(partial[:, 9] == 1, -1, partial[:, 9])  # class 9: no known positive
    LabelSet(test.classes, test.image_paths, partial, root=test.root, split="test").save(tmp_path / "partial",
                                                                                       storage="sparse")
    assert LabelSet.load(tmp_path / "partial").sparse
    result = run("eval", "--checkpoint", out, "--data", tmp_path / "partial", "--workers", "0",
                 "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert "known entries only" in result.output and "mAP over the 9 of 10 classes with a known positive" in \
        result.output
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["mAP_classes"] == 9 and evaluated["per_class_ap"]["9"] is None
    # the saved test scores of the run, scored densely over the known entries, give the same figures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = metrics_table(np.load(out / "test_scores.npy"), partial, empty="exclude")
    for key in ("mAP", "mAP_voc", "CF1", "OF1", "CF1_top3"):
        assert evaluated[key] == pytest.approx(expected[key], abs=1e-4), key
    assert f"{expected['mAP']:.2f}" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "nowhere.png", "--checkpoint", "nowhere"], "nowhere/model.json: not found"),
        (["train", "--data", "no_such_dir", "--quiet"], "no_such_dir: no such folder"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--observe", "half", "--digits-size", "20,8,8"], "unknown observation scheme"),
        (["train", "--loss-arg", "gamma", "--digits-size", "20,8,8"], "write KEY=VALUE"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_checkpoint_with_other_classes_is_refused(trained, tmp_path):
    import numpy as np

    from mlic.data.labelset import LabelSet

    out, _ = trained
    other = LabelSet(["cat", "dog"], ["a.png"], np.ones((1, 2), np.int8), root=str(tmp_path))
    other.save(tmp_path / "other")
    result = runner.invoke(app, ["eval", "--checkpoint", str(out), "--data", str(tmp_path / "other")])
    assert result.exit_code == 2 and "do not match" in result.output


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mlic", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout


def test_query2label_train_and_explain(tmp_path):
    out = tmp_path / "q2l"
    result = run("train", "--digits-size", "64,24,24", "--img-size", "32", "--epochs", "1", "--batch-size", "32",
                 "--workers", "0", "--head", "query2label", "--head-arg", "hidden_dim=32", "--head-arg",
                 "dim_feedforward=64", "--head-arg", "nheads=2", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    image = next((tmp_path / "cache").glob("multidigits-*/images/test/000000.png"))
    result = run("predict", image, "--checkpoint", out, "--explain", tmp_path / "maps", "--threshold", "0.0",
                 "--top-k", "3")
    assert result.exit_code == 0, result.output
    png = tmp_path / "maps" / "000000_attention.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_convert_errors_are_one_line(tmp_path):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "checkpoint.pkl").write_bytes(b"junk")
    result = runner.invoke(app, ["convert", "q2l", str(tmp_path / "release"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no config_new.json" in result.output and "Traceback" not in result.output


def test_single_positive_linear_probe(tmp_path):
    out = tmp_path / "probe"
    result = run("train", "--digits-size", "96,32,32", "--img-size", "32", "--mode", "linear", "--observe",
                 "single-positive", "--loss", "role", "--epochs", "3", "--workers", "0", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "1.00 positives and 0.00 negatives known per image" in result.output
    estimated = np.load(out / "estimated_labels.npy")
    assert estimated.shape[1] == 10 and estimated.min() >= 0 and estimated.max() <= 1
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # the saved model is a whole classifier: predict works on it
    image = next((tmp_path / "cache").glob("multidigits-*/images/test/000000.png"))
    assert run("predict", image, "--checkpoint", out).exit_code == 0
