"""Streaming prediction: order, unreadable files, resume, path lists, LabelSets, engine choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mlic.cli import app
from mlic.config import ModelConfig
from mlic.data.labelset import LabelSet
from mlic.engine.checkpoint import CheckpointError, save_model
from mlic.engine.predict import Predictor, read_path_list
from mlic.engine.results import ResultWriter
from mlic.models.classifier import build_model

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    config = ModelConfig(num_classes=3, img_size=32)
    save_model(root / "run", build_model(config), config, ["x", "y", "z"], thresholds=[0.0, 0.5, 1.0])
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "3.png").write_bytes(b"\x89PNG truncated")  # unreadable, in the middle of a batch
    Image.open(images / "4.png").save(images / "4.jpg", quality=90)
    data = (images / "4.jpg").read_bytes()
    (images / "5.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    return root


def test_stream_keeps_order_and_reports_bad_files(setup):
    predictor = Predictor(setup / "run")
    paths = sorted((setup / "imgs").glob("*"))
    batches = list(predictor.stream(paths, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 3]
    flat = [p for b in batches for p in b]
    assert [p.path for p in flat] == [str(p) for p in paths]
    bad = {p.path.rsplit("/", 1)[-1]: p.error for p in flat if p.error}
    assert set(bad) == {"3.png", "5.jpg"} and all(m.startswith(str(setup / "imgs")) for m in bad.values())
    good = [p for p in flat if not p.error]
    # batched scores equal one-image-at-a-time scores
    single = predictor.predict([good[0].path])[0]
    np.testing.assert_allclose(single.scores, good[0].scores, atol=1e-6)
    assert [c for c, _ in good[0].labels][:1] == ["x"]  # threshold 0 for x: always a label
    assert "z" not in [c for c, _ in good[0].labels]  # threshold 1: never
    with_workers = [p for b in predictor.stream(paths, batch_size=4, workers=2) for p in b]
    assert [p.path for p in with_workers] == [p.path for p in flat]
    np.testing.assert_allclose(np.stack([p.scores for p in with_workers]), np.stack([p.scores for p in flat]))


def test_resume_skips_written_paths_and_cuts_a_half_line(setup, tmp_path):
    imgs = setup / "imgs"
    out = tmp_path / "p.jsonl"
    result = runner.invoke(app, ["predict", str(imgs), "--checkpoint", str(setup / "run"), "--jsonl", str(out),
                                 "--csv", str(tmp_path / "p.csv"), "--workers", "0", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    full = out.read_text().splitlines()
    assert len(full) == 9 and sum(json.loads(line)["error"] is not None for line in full) == 2
    assert "3.png\terror:" in result.output and "2 unreadable" in result.output
    out.write_text("\n".join(full[:3]) + "\n" + full[3][:20])  # a crash after three rows and a half
    result = runner.invoke(app, ["predict", str(imgs), "--checkpoint", str(setup / "run"), "--jsonl", str(out),
                                 "--workers", "0", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming: 3 of 9 images already written" in result.output
    again = out.read_text().splitlines()
    assert [json.loads(line)["path"] for line in again] == [json.loads(line)["path"] for line in full]
    csv_rows = (tmp_path / "p.csv").read_text().splitlines()
    assert csv_rows[0] == "path,labels,x,y,z" and len(csv_rows) == 10


def test_list_file_and_labelset_inputs(setup, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text(f"# two files\n{setup / 'imgs' / '0.png'}\n\nmissing.png\n")
    assert read_path_list(listing) == [setup / "imgs" / "0.png", tmp_path / "missing.png"]
    result = runner.invoke(app, ["predict", "--list", str(listing), "--checkpoint", str(setup / "run"),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "0.png\tx " in result.output and "missing.png: image not found" in result.output
    labelset = LabelSet(["x", "y", "z"], ["0.png", "1.png"], np.zeros((2, 3), np.int8), root=str(setup / "imgs"))
    labelset.save(tmp_path / "ls")
    result = runner.invoke(app, ["predict", str(tmp_path / "ls"), "--checkpoint", str(setup / "run"),
                                 "--workers", "0"])
    assert result.exit_code == 0 and result.output.count("\tx ") == 2, result.output


def foreign_onnx(path):
    """A valid ONNX model that mlic did not export (float input, no metadata)."""
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install -e '.[deploy]')")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "g", [x], [y])),
              str(path))
    return path


def test_engine_errors_are_one_line(setup, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[deploy]')")
    with pytest.raises(CheckpointError, match="model.onnx: not found; write it with 'mlic export onnx"):
        Predictor(setup / "run", engine="onnx")
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere")], "nowhere/model.json: not found"),
        (["--checkpoint", str(setup / "run"), "--engine", "tf"], "--engine 'tf': choose torch or onnx"),
        (["--checkpoint", str(tmp_path / "none.onnx")], "none.onnx: no such ONNX file"),
        (["--checkpoint", str(setup / "run"), "--resume"], "--resume needs --jsonl or --csv"),
        (["--checkpoint", str(foreign_onnx(tmp_path / "other.onnx")), "--engine", "onnx"],
         "other.onnx: no mlic metadata"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["predict", str(setup / "imgs" / "0.png"), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    only_bad = runner.invoke(app, ["predict", str(setup / "imgs" / "3.png"), "--checkpoint", str(setup / "run"),
                                   "--workers", "0"])
    assert only_bad.exit_code == 2 and "3.png\terror:" in only_bad.output


def test_writer_refuses_foreign_files(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv: exists and is not a CSV written by mlic predict"):
        ResultWriter(["x"], csv_path=tmp_path / "other.csv", resume=True)
