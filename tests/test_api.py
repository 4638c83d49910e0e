"""The Python API: mlic.train / load / evaluate and Model.predict, as a script would use them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlic
from mlic.errors import MlicError

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = {"digits_size": "64,32,32", "img_size": 32, "epochs": 2, "batch_size": 16, "workers": 0, "quiet": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLIC_CACHE", str(root / "cache"))
        run = mlic.train(out=root / "run", log=lines.append, **SMALL)
    return root, run, lines


def test_train_returns_the_run_the_cli_would_write(trained):
    root, run, lines = trained
    assert run.out_dir == root / "run" and run.best_epoch in (1, 2) and len(run.history) == 2
    assert [h["epoch"] for h in run.history] == [1, 2]
    saved = json.loads((root / "run" / "test_metrics.json").read_text())
    assert saved["mAP"] == pytest.approx(run.test_metrics["mAP"])
    assert any(line.startswith("model: digitnet + linear head, 10 classes") for line in lines)
    with pytest.raises(MlicError, match="holds a run already"):  # the CLI's refusals, the same
        mlic.train(out=root / "run", **SMALL)


def test_an_unknown_keyword_is_one_line_naming_the_valid_ones():
    with pytest.raises(MlicError, match=r"mlic.train: unknown keyword\(s\) epoch; it takes data, out, .*epochs"):
        mlic.train(epoch=3)


def modes(image: Image.Image) -> dict:
    rgba = image.convert("RGBA")
    rgba.putalpha(200)
    i16 = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257).convert("I;16")
    return {"L": image.convert("L"), "LA": image.convert("LA"), "P": image.convert("P"), "RGBA": rgba,
            "CMYK": image.convert("CMYK"), "I;16": i16}


def test_predict_takes_any_image_and_matches_the_file_path(trained, tmp_path):
    root, run, _ = trained
    model = mlic.load(run.out_dir)
    assert model.classes == [str(d) for d in range(10)] and model.image_size == 32
    assert model.thresholds.shape == (10,) and model.config.backbone == "digitnet"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image.save(tmp_path / "a.png")
    from_file = model.scores([tmp_path / "a.png"])[0]
    np.testing.assert_allclose(model.scores([image])[0], from_file, atol=1e-6)
    np.testing.assert_allclose(model.scores([pixels])[0], from_file, atol=1e-6)
    np.testing.assert_allclose(model.scores([torch.from_numpy(pixels).permute(2, 0, 1)])[0], from_file, atol=1e-6)
    np.testing.assert_allclose(model.scores([pixels / 255.0])[0], from_file, atol=1e-6)
    for mode, converted in modes(image).items():
        converted.save(tmp_path / f"m.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}")
        got = model.scores([converted])[0]
        assert got.shape == (10,) and np.isfinite(got).all(), mode
        on_disk = model.scores([tmp_path / f"m.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"])[0]
        np.testing.assert_allclose(got, on_disk, atol=1e-5, err_msg=mode)  # the same pixels as the file


def test_exif_orientation_is_applied_as_for_a_file(trained, tmp_path):
    root, run, _ = trained
    model = mlic.load(run.out_dir)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    image.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "r.jpg") as opened:
        opened.load()
        from_pil = model.scores([opened])[0]
    np.testing.assert_allclose(from_pil, model.scores([tmp_path / "r.jpg"])[0], atol=1e-3)
    upright = Image.fromarray(np.asarray(Image.open(tmp_path / "r.jpg").transpose(Image.Transpose.ROTATE_270)))
    np.testing.assert_allclose(from_pil, model.scores([upright])[0], atol=1e-3)


def test_a_bad_image_is_one_error_and_the_others_are_scored(trained, tmp_path):
    root, run, _ = trained
    model = mlic.load(run.out_dir)
    (tmp_path / "notes.png").write_text("not an image")
    good = Image.new("RGB", (20, 20), (10, 200, 30))
    preds = model.predict([good, tmp_path / "notes.png", np.zeros((5, 5, 7), np.uint8), good], top_k=3)
    assert [p.error is None for p in preds] == [True, False, False, True]
    assert "notes.png" in preds[1].error and "not an image" in preds[2].error
    assert len(preds[0].labels) <= 3 and np.isnan(preds[1].scores).all()
    scores = model.scores([good, tmp_path / "notes.png"])
    assert np.isfinite(scores[0]).all() and np.isnan(scores[1]).all()
    with pytest.raises(MlicError, match="give a list of images"):
        model.predict(good)
    with pytest.raises(MlicError, match="explain needs a Query2Label model"):
        model.explain(good)


def test_evaluate_equals_mlic_eval(trained, tmp_path, monkeypatch):
    root, run, _ = trained
    monkeypatch.setenv("MLIC_CACHE", str(root / "cache"))
    data = root / "cache"
    ours = mlic.evaluate(mlic.load(run.out_dir), data=next(data.glob("multidigits*")), split="test", workers=0)
    from typer.testing import CliRunner

    from mlic.cli import app

    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(run.out_dir), "--data",
                                      str(next(data.glob("multidigits*"))), "--workers", "0", "--json",
                                      str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    theirs = json.loads((tmp_path / "m.json").read_text())
    assert ours["mAP"] == pytest.approx(theirs["mAP"]) and ours["per_class_ap"].keys() == theirs["per_class_ap"].keys()


def test_a_loss_registered_in_a_script_trains_in_both_modes(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text(
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "import mlic\n\n"
        "@mlic.register_loss('my_bce')\n"
        "class MyBCE(nn.Module):\n"
        "    labels = 'full'\n"
        "    paper = 'a user loss'\n"
        "    def forward(self, logits, targets, indices=None):\n"
        "        known = targets >= 0\n"
        "        return F.binary_cross_entropy_with_logits(logits[known], targets[known].float())\n")
    env_cache = str(tmp_path / "cache")
    for mode in ("finetune", "linear"):
        code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import mine, mlic; "
                f"run = mlic.train(loss='my_bce', mode={mode!r}, out={str(tmp_path / mode)!r}, digits_size='64,32,32',"
                f" img_size=32, epochs=1, batch_size=16, workers=0, quiet=True, log=lambda *a, **k: None); "
                "print('mAP', run.test_metrics['mAP'])")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={"MLIC_CACHE": env_cache, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0 and re.search(r"mAP \d", done.stdout), done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "mlic", "train", "--import", str(script), "--loss", "my_bce",
                           "--digits-size", "64,32,32", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
                           "--workers", "0", "--quiet", "--out", str(tmp_path / "cli")], capture_output=True,
                          text=True, timeout=300, env={"MLIC_CACHE": env_cache, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "test (32 images)" in done.stdout, done.stderr[-2000:]


def python_section() -> str:
    text = README.read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(block for block in re.findall(r"```python\n(.*?)```", section, re.S))


def test_the_readme_python_section_runs_as_written(tmp_path):
    code = python_section()
    assert "mlic.train(" in code and "mlic.load(" in code and "model.predict(" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"MLIC_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mAP" in done.stdout


def test_import_mlic_is_light():
    done = subprocess.run([sys.executable, "-c", "import sys, mlic; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.stdout.strip() == "False"
    assert set(mlic.__all__) >= {"train", "load", "evaluate", "Model", "TrainConfig", "ModelConfig",
                                 "register_loss", "register_head", "register_backbone"}



def test_load_an_onnx_export_and_explain_a_query2label_model(tmp_path):
    from mlic.config import ModelConfig
    from mlic.engine.checkpoint import save_model
    from mlic.export import export_onnx
    from mlic.models.classifier import build_model

    torch.manual_seed(0)
    config = ModelConfig(head="query2label", num_classes=3, img_size=32,
                         head_args={"hidden_dim": 16, "dim_feedforward": 32, "nheads": 2})
    net = build_model(config).eval()
    save_model(tmp_path / "q2l", net, config, ["x", "y", "z"])
    model = mlic.load(tmp_path / "q2l")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    explained = model.explain(image)
    assert explained.classes == ["x", "y", "z"] and explained.maps.shape[0] == 3
    np.testing.assert_allclose(explained.maps.reshape(3, -1).sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(explained.scores, model.scores([image])[0], atol=1e-5)
    export_onnx(net, {"classes": ["x", "y", "z"]}, tmp_path / "m.onnx")
    onnx_model = mlic.load(tmp_path / "m.onnx")
    assert onnx_model.config is None and onnx_model.classes == ["x", "y", "z"] and onnx_model.image_size == 32
    np.testing.assert_allclose(onnx_model.scores([image])[0], model.scores([image])[0], atol=1e-4)
    with pytest.raises(MlicError, match="explain needs a Query2Label model loaded in PyTorch"):
        onnx_model.explain(image)
