"""The HTTP service: predictions, model info, batching, and every bad input of issue 11 answered in JSON."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="fastapi not installed (pip install -e '.[deploy]')")
from fastapi.testclient import TestClient  # noqa: E402

from mlic.config import ModelConfig  # noqa: E402
from mlic.engine.checkpoint import save_model  # noqa: E402
from mlic.engine.predict import Predictor  # noqa: E402
from mlic.models.classifier import build_model  # noqa: E402
from mlic.serve.app import ServeConfig, create_app  # noqa: E402


def png_bytes(h: int = 40, w: int = 50, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def huge_png_header(side: int = 30000) -> bytes:
    """A valid PNG signature and header declaring side x side pixels, with a tiny body: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    out = {}
    for head, args in (("linear", {}), ("query2label", {"hidden_dim": 32, "dim_feedforward": 64, "nheads": 2})):
        config = ModelConfig(num_classes=3, img_size=32, head=head, head_args=args)
        save_model(root / head, build_model(config), config, ["x", "y", "z"], thresholds=[0.0, 0.5, 1.0])
        out[head] = Predictor(root / head)
    return out


@pytest.fixture(scope="module")
def client(predictors):
    app = create_app(predictors["linear"], ServeConfig(max_files=4, max_upload_mb=0.5, max_pixels=1_000_000))
    with TestClient(app) as c:
        yield c


def test_predict_one_and_several(client, predictors):
    data = png_bytes()
    r = client.post("/v1/predict", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 200, r.text
    (row,) = r.json()["results"]
    expected = predictors["linear"].scores([Image.open(io.BytesIO(data)).convert("RGB")])[0]
    assert row["file"] == "a.png" and set(row["scores"]) == {"x", "y", "z"}
    np.testing.assert_allclose([row["scores"][c] for c in "xyz"], expected, atol=1e-5)
    assert row["labels"][0]["label"] == "x" and "z" not in [lab["label"] for lab in row["labels"]]
    files = [("file", (f"{i}.png", png_bytes(seed=i), "image/png")) for i in range(3)]
    r = client.post("/v1/predict", files=files, data={"threshold": "0", "top_k": "2"})
    assert r.status_code == 200 and [row["file"] for row in r.json()["results"]] == ["0.png", "1.png", "2.png"]
    assert all(len(row["labels"]) == 2 for row in r.json()["results"])


def test_model_and_health(client):
    info = client.get("/v1/model").json()
    assert info["classes"] == ["x", "y", "z"] and info["thresholds"] == [0.0, 0.5, 1.0]
    assert info["img_size"] == 32 and info["head"] == "linear" and info["engine"] == "torch"
    assert info["limits"]["max_files"] == 4 and "api_key" not in info["limits"]
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "<script" in page.text
    assert client.get("/static/app.js").status_code == 200


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(200, 200))).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[:1500]


@pytest.mark.parametrize("files, data, status, message", [
    ({"file": ("x.bin", b"\x00garbage bytes" * 10, "application/octet-stream")}, None, 415, "x.bin: not an image"),
    ({"file": ("t.jpg", truncated_jpeg(), "image/jpeg")}, None, 400, "t.jpg: "),
    ({"file": ("bomb.png", huge_png_header(), "image/png")}, None, 400, "bomb.png: refused, too many pixels"),
    ({"file": ("big.png", huge_png_header(1200), "image/png")}, None, 400, "over the limit of 1000000"),
    ({"file": ("e.png", b"", "image/png")}, None, 400, "e.png: empty file"),
    (None, {"threshold": "0.5"}, 400, "no image in the request"),
    ([("file", (f"{i}.png", b"x", "image/png")) for i in range(500)], None, 400, "too many files: at most 4"),
    ({"file": ("a.png", png_bytes(), "image/png")}, {"threshold": "2"}, 400, "threshold '2'"),
    ({"file": ("a.png", png_bytes(), "image/png")}, {"top_k": "zero"}, 400, "top_k 'zero'"),
    ({"file": ("a.bin", b"\0" * 600_000, "image/png")}, None, 413, "over the upload limit of 0.5 MB"),
])
def test_bad_inputs_are_json_errors_and_service_keeps_serving(client, files, data, status, message):
    r = client.post("/v1/predict", files=files, data=data)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "Traceback" not in r.text
    assert client.post("/v1/predict", files={"file": ("ok.png", png_bytes(), "image/png")}).status_code == 200


def test_empty_body(client):
    r = client.post("/v1/predict")
    assert r.status_code == 400 and "error" in r.json()


def test_api_key(predictors):
    app = create_app(predictors["linear"], ServeConfig(api_key="s3cret"))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200  # liveness needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/model", headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert c.post("/v1/predict", headers=headers, files={"file": ("a.png", png_bytes())}).status_code == 401
        ok = c.post("/v1/predict", headers={"Authorization": "Bearer s3cret"}, files={"file": ("a.png", png_bytes())})
        assert ok.status_code == 200


def test_attention_maps_for_query2label(predictors):
    with TestClient(create_app(predictors["query2label"])) as c:
        assert c.get("/v1/model").json()["attention"] is True
        r = c.post("/v1/predict", files={"file": ("a.png", png_bytes())}, data={"attention": "true"})
        row = r.json()["results"][0]
        maps = np.array(list(row["attention"].values()))
        assert maps.ndim == 3 and maps.shape[1:] == (4, 4)  # digitnet's stride-8 grid of a 32 px input
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-3)
    with TestClient(create_app(predictors["linear"])) as c:
        r = c.post("/v1/predict", files={"file": ("a.png", png_bytes())}, data={"attention": "true"})
        assert r.status_code == 200 and "attention" not in r.json()["results"][0]


def test_serve_missing_checkpoint_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from mlic.cli import app

    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere/model.json: not found" in result.output
    assert "Traceback" not in result.output
