"""ONNX export: same probabilities as PyTorch for every head, metadata, dynamic batch, int8, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[deploy]')")

from mlic.config import ModelConfig  # noqa: E402
from mlic.engine.checkpoint import save_model  # noqa: E402
from mlic.export import ExportError, check_batch, export_onnx, ort_session, read_onnx_metadata  # noqa: E402
from mlic.models.classifier import build_model  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "q2l_official_r101.pt"
Q2L_ARGS = {"hidden_dim": 32, "dim_feedforward": 64, "nheads": 2}


def tiny(head: str, num_classes: int = 4, img_size: int = 32):
    torch.manual_seed(0)
    config = ModelConfig(num_classes=num_classes, img_size=img_size, head=head,
                         head_args=Q2L_ARGS if head == "query2label" else {})
    return build_model(config).eval()


@pytest.fixture(scope="module")
def linear_onnx():
    """The tiny linear model and its traced graph, traced once: tracing is the slow part (seconds)."""
    from mlic.export import ProbabilityGraph, to_onnx

    model = tiny("linear")
    return model, to_onnx(ProbabilityGraph(model))


@pytest.fixture
def traced_once(linear_onnx, monkeypatch):
    """export_onnx on the tiny linear model reuses the module's trace (checks, metadata and writing still run)."""
    import copy

    import mlic.export

    model, proto = linear_onnx
    monkeypatch.setattr(mlic.export, "to_onnx", lambda graph: copy.deepcopy(proto))
    return model


def run_onnx(path, images: np.ndarray) -> np.ndarray:
    return ort_session(path).run(["probabilities"], {"images": images})[0]


@pytest.mark.parametrize("head", ["linear", "query2label"])
def test_export_matches_torch_with_metadata(head, tmp_path, request):
    model = request.getfixturevalue("traced_once") if head == "linear" else tiny(head)
    meta = {"classes": ["a", "b", "c", "d"], "thresholds": [0.1, 0.2, 0.3, 0.4]}
    result = export_onnx(model, meta, tmp_path / "m.onnx", int8=head == "linear")
    assert result.max_diff <= 1e-4
    if head == "linear":  # the int8 copy: beside the float one, marked, close but not equal
        assert result.int8_path == tmp_path / "m.int8.onnx"
        assert read_onnx_metadata(result.int8_path)["quantization"]
        assert 0 < result.int8_max_diff < 0.2
    info = read_onnx_metadata(tmp_path / "m.onnx")
    assert info["classes"] == meta["classes"] and info["thresholds"] == meta["thresholds"]
    assert info["img_size"] == 32 and info["head"] == head and info["mlic_version"]
    for batch in (1, 5):  # dynamic batch axis; normalisation is inside the graph
        images = check_batch(32, batch, seed=batch + 10)
        with torch.no_grad():
            expected = torch.sigmoid(model((torch.from_numpy(images).float() / 255 - torch.tensor(
                model.config.mean).view(1, 3, 1, 1)) / torch.tensor(model.config.std).view(1, 3, 1, 1))).numpy()
        np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", images), expected, atol=1e-5, rtol=0)


def test_official_query2label_exports(tmp_path):
    if not FIXTURE.is_file():
        pytest.skip(f"official Query2Label fixture not found at {FIXTURE} (shared/ is not part of the repo)")
    from mlic.models.official import COCO_CLASSES, load_query2label

    fixture = torch.load(FIXTURE, weights_only=False)  # our own trusted file
    model = load_query2label(fixture["state_dict"], fixture["config"])
    result = export_onnx(model, {"classes": COCO_CLASSES}, tmp_path / "q2l.onnx")
    assert result.max_diff <= 1e-4
    info = read_onnx_metadata(tmp_path / "q2l.onnx")
    assert info["img_size"] == 224 and info["head"] == "query2label" and len(info["classes"]) == 80


def test_parity_failure_is_one_line_and_writes_nothing(tmp_path, traced_once):
    model = traced_once
    with pytest.raises(ExportError, match=r"m.onnx: onnxruntime and PyTorch differ by .* > 1e-09"):
        export_onnx(model, {"classes": list("abcd")}, tmp_path / "m.onnx", tolerance=1e-9)
    assert not (tmp_path / "m.onnx").exists()


def test_foreign_onnx_is_refused(tmp_path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    save(helper.make_model(helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "other", [x], [y])),
         str(tmp_path / "other.onnx"))
    with pytest.raises(ExportError, match="other.onnx: no mlic metadata"):
        read_onnx_metadata(tmp_path / "other.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="junk.onnx: not a readable ONNX model"):
        read_onnx_metadata(tmp_path / "junk.onnx")


def test_cli_export_and_predict_with_both_engines(tmp_path, traced_once):
    from PIL import Image
    from typer.testing import CliRunner

    from mlic.cli import app

    model = traced_once
    save_model(tmp_path / "run", model, model.config, ["w", "x", "y", "z"], thresholds=[0.0, 0.5, 1.0, 1.0])
    runner = CliRunner()
    result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "run"), "-o",
                                 str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "parity: max |PyTorch - onnxruntime| = " in result.output
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    outs = {}
    for name, ckpt in (("torch", tmp_path / "run"), ("onnx", tmp_path / "m.onnx")):
        result = runner.invoke(app, ["predict", *(str(tmp_path / f"{i}.png") for i in range(3)), "--checkpoint",
                                     str(ckpt), "--jsonl", str(tmp_path / f"{name}.jsonl"), "--workers", "0"])
        assert result.exit_code == 0, result.output
        import json

        outs[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    for a, b in zip(outs["torch"], outs["onnx"]):
        assert a["path"] == b["path"]
        assert max(abs(a["scores"][k] - b["scores"][k]) for k in "wxyz") <= 1e-5
    result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "nowhere"), "-o", "x.onnx"])
    assert result.exit_code == 2 and "nowhere/model.json: not found" in result.output
    assert "Traceback" not in result.output


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of a given size (root only): a real full disk, not a patched write."""
    import subprocess

    mounted = []

    def make(size_kb: int):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode:
            pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk case is not exercised")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_export_onto_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, traced_once, small_disk):
    from typer.testing import CliRunner

    from mlic.cli import app

    model = traced_once
    save_model(tmp_path / "run", model, model.config, ["w", "x", "y", "z"])
    runner = CliRunner()
    result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "run"), "-o",
                                 str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    size_kb = (tmp_path / "m.onnx").stat().st_size // 1024
    for disk_kb, name in ((size_kb // 2, "m.onnx"), (size_kb + 8, "m.int8.onnx")):
        disk = small_disk(disk_kb)  # half the float model; then the float model but not its int8 copy
        result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "run"), "-o",
                                     str(disk / "m.onnx"), "--int8"])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{disk / name}" in errors[0], result.output
        assert not [p.name for p in disk.iterdir() if p.name.endswith(".tmp")]
        assert [p.name for p in disk.iterdir()] == ([] if name == "m.onnx" else ["m.onnx"])


def test_export_never_replaces_what_it_did_not_write(tmp_path, traced_once):
    from typer.testing import CliRunner

    from mlic.cli import app

    model = traced_once
    save_model(tmp_path / "run", model, model.config, ["w", "x", "y", "z"])
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    runner = CliRunner()
    (tmp_path / "other.onnx").write_bytes(b"a user's file")
    for target, extra, fragment in ((tmp_path / "run" / "model.safetensors", [], "must end in .onnx"),
                                    (tmp_path / "other.onnx", [], "not an ONNX file written by mlic"),
                                    (tmp_path / "run" / "model.json", ["--overwrite"], "must end in .onnx")):
        result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "run"), "-o", str(target),
                                     *extra])
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "other.onnx").read_bytes() == b"a user's file"
    result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "run"), "-o",
                                 str(tmp_path / "other.onnx"), "--overwrite"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "run"), "-o",
                                 str(tmp_path / "other.onnx")])
    assert result.exit_code == 0, result.output  # now mlic's own export: replaced without a word


@pytest.mark.parametrize("key, value, fragment", [
    ("mlic_classes", "[\"a\", ", "its mlic metadata is damaged"),
    ("mlic_classes", "[\"a\", \"b\"]", "2 class names for a model with 4 outputs"),
    ("mlic_thresholds", "[0.5]", "'thresholds' must be 4 numbers"),
    ("mlic_img_size", "99999", "mlic_img_size 99999 is not an input size"),
    ("mlic_classes", "[\"a\", \"a\", \"b\", \"c\"]", "appears twice"),
])
def test_damaged_onnx_metadata_is_one_line(tmp_path, traced_once, key, value, fragment):
    import onnx

    from mlic.export import ExportError, export_onnx, read_onnx_metadata

    model = traced_once
    export_onnx(model, {"classes": ["w", "x", "y", "z"]}, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(proto, str(tmp_path / "m.onnx"))
    with pytest.raises(ExportError, match="m.onnx") as err:
        read_onnx_metadata(tmp_path / "m.onnx")
    assert fragment in str(err.value)
