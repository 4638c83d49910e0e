"""The HTTP service: predictions, model info, batching, and every bad input of issue 11 answered in JSON."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
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
from mlic.serve import app as serve_app  # noqa: E402
from mlic.serve.app import ServeConfig, create_app, host_allowed  # noqa: E402


def local(app) -> TestClient:
    """A client whose requests carry ``Host: 127.0.0.1:8000``, as a browser on this machine sends (TestClient's own
    ``testserver`` is a name the service refuses without an API key)."""
    return TestClient(app, base_url="http://127.0.0.1:8000")


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
    with local(app) as c:
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
    ({"file": ("x.bin", b"\x00garbage bytes" * 10, "application/octet-stream")}, None, 415,
     "x.bin: cannot decode image: not in a format mlic reads (JPEG"),
    ({"file": ("t.jpg", truncated_jpeg(), "image/jpeg")}, None, 400, "t.jpg: "),
    ({"file": ("bomb.png", huge_png_header(), "image/png")}, None, 400, "bomb.png: refused, decompression bomb"),
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
    with local(app) as c:
        assert c.get("/healthz").status_code == 200  # liveness needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/model", headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert c.post("/v1/predict", headers=headers, files={"file": ("a.png", png_bytes())}).status_code == 401
        ok = c.post("/v1/predict", headers={"Authorization": "Bearer s3cret"}, files={"file": ("a.png", png_bytes())})
        assert ok.status_code == 200


def test_attention_maps_for_query2label(predictors):
    with local(create_app(predictors["query2label"])) as c:
        assert c.get("/v1/model").json()["attention"] is True
        r = c.post("/v1/predict", files={"file": ("a.png", png_bytes())}, data={"attention": "true"})
        row = r.json()["results"][0]
        maps = np.array(list(row["attention"].values()))
        assert maps.ndim == 3 and maps.shape[1:] == (4, 4)  # digitnet's stride-8 grid of a 32 px input
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-3)
    with local(create_app(predictors["linear"])) as c:
        r = c.post("/v1/predict", files={"file": ("a.png", png_bytes())}, data={"attention": "true"})
        assert r.status_code == 200 and "attention" not in r.json()["results"][0]


def test_serve_missing_checkpoint_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from mlic.cli import app

    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere/model.json: not found" in result.output
    assert "Traceback" not in result.output


# ---- formats: only those the docs name are decoded ---------------------------------------------------------

def encoded(fmt: str, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)).convert(mode).save(
        buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("BMP", "RGB"),
                                       ("GIF", "P"), ("TIFF", "RGB")])
def test_the_documented_formats_are_read(client, fmt, mode):
    r = client.post("/v1/predict", files={"file": (f"a.{fmt.lower()}", encoded(fmt, mode))})
    assert r.status_code == 200, r.text


EPS_HEADER = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\n%%EndComments\nshowpage\n"


@pytest.mark.parametrize("name, data, kind", [
    ("x.eps", EPS_HEADER, "EPS"), ("pil.eps", encoded("EPS"), "EPS"), ("x.pcx", encoded("PCX"), "PCX"),
    ("x.tga", encoded("TGA"), "TGA"), ("x.ppm", encoded("PPM"), "PPM"),
])
def test_other_formats_are_refused_before_any_plugin_parses_them(client, monkeypatch, name, data, kind):
    from PIL import EpsImagePlugin

    def never(self):
        raise AssertionError("the EPS plugin parsed an upload")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    r = client.post("/v1/predict", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 415, r.text
    assert r.json()["error"] == (f"{name}: {kind} file, not a format mlic reads (JPEG, PNG, WebP, BMP, GIF, TIFF); "
                                 "convert it to one of them")


# ---- Host header (DNS rebinding) ---------------------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [
    (b"127.0.0.1:8000", True), (b"localhost:8000", True), (b"LOCALHOST", True), (b"[::1]:8000", True),
    (b"192.168.1.20:8000", True), (b"10.0.0.5", True), (b"", True), (b"box.lan:8000", True),
    (b"evil.example", False), (b"evil.example:8000", False), (b"localhost.evil.example", False),
    (b"127.0.0.1.nip.io", False), (b"[::1].evil", False), (b"[::1]x", False), (b"localhost:x", False),
])
def test_host_header_rule(host, allowed):
    assert host_allowed(host, ServeConfig(host="0.0.0.0", allow_hosts=["box.lan"])) is allowed


def test_foreign_host_is_refused_without_api_key_only(predictors):
    with local(create_app(predictors["linear"])) as c:
        for path in ("/healthz", "/v1/model", "/"):
            r = c.get(path, headers={"Host": "evil.example"})
            assert r.status_code == 421
            assert "Host 'evil.example' refused" in r.json()["error"] and "--api-key" in r.json()["error"]
        r = c.post("/v1/predict", headers={"Host": "evil.example:8000"}, files={"file": ("a.png", png_bytes())})
        assert r.status_code == 421 and "--allow-host evil.example" in r.json()["error"]
        assert c.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
    with local(create_app(predictors["linear"], ServeConfig(api_key="k"))) as c:  # the key is the defence then
        assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 200
        assert c.get("/v1/model", headers={"Host": "evil.example"}).status_code == 401


# ---- decoding pool, body budget and deadline --------------------------------------------------------------

def test_decodes_run_at_most_decode_workers_at_once(predictors, monkeypatch):
    running, most = [0], [0]
    lock = threading.Lock()
    real = serve_app.decode_upload

    def slow(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_app, "decode_upload", slow)
    with local(create_app(predictors["linear"], ServeConfig(decode_workers=2, max_files=8))) as c:
        files = [("file", (f"{i}.png", png_bytes(seed=i), "image/png")) for i in range(8)]
        r = c.post("/v1/predict", files=files)
    assert r.status_code == 200 and [row["file"] for row in r.json()["results"]] == [f"{i}.png" for i in range(8)]
    assert most[0] == 2


def test_bodies_over_the_inflight_budget_wait_for_503_and_slow_bodies_get_408(predictors, monkeypatch):
    import httpx

    release = threading.Event()
    real = serve_app.decode_upload

    def held(*args, **kwargs):  # the first request sits in decoding, holding its body
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_app, "decode_upload", held)
    config = ServeConfig(max_upload_mb=1, max_inflight_mb=1, timeout_body=0.3)
    app = create_app(predictors["linear"], config)
    body = png_bytes() + b"\0" * 600_000  # trailing bytes after IEND: a valid PNG of 0.6 MB

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
            first = asyncio.ensure_future(c.post("/v1/predict", files={"file": ("a.png", body)}))
            await asyncio.sleep(0.3)
            busy = await c.post("/v1/predict", files={"file": ("b.png", body)})
            release.set()
            done = await first
            after = await c.post("/v1/predict", files={"file": ("c.png", body)})

            async def stalled():
                yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.png\"\r\n\r\n"
                await asyncio.sleep(2)
                yield b"\r\n--x--\r\n"

            start = time.monotonic()
            slow = await c.post("/v1/predict", content=stalled(),
                                headers={"Content-Type": "multipart/form-data; boundary=x"})
            return busy, done, after, slow, time.monotonic() - start

    busy, done, after, slow, waited = asyncio.run(scenario())
    assert busy.status_code == 503 and "--max-inflight-mb" in busy.json()["error"]
    assert busy.headers["Retry-After"] == "1"
    assert done.status_code == 200 and after.status_code == 200  # the budget is given back after each request
    assert slow.status_code == 408 and "--timeout-body" in slow.json()["error"] and waited < 1.5


# ---- the command: impossible options, exposure warning ------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "error: --port 99999: give a TCP port from 1 to 65535"),
    (["--port", "-1"], "error: --port -1:"),
    (["--max-batch", "0"], "error: --max-batch 0: give a number above 0"),
    (["--max-files", "-3"], "error: --max-files -3: give a number above 0"),
    (["--max-pixels", "0"], "error: --max-pixels 0:"),
    (["--max-upload-mb", "0"], "error: --max-upload-mb 0:"),
    (["--max-wait-ms", "-1"], "error: --max-wait-ms -1: give 0 or more milliseconds"),
    (["--decode-workers", "0"], "error: --decode-workers 0:"),
    (["--max-connections", "0"], "error: --max-connections 0:"),
    (["--timeout-header", "0"], "error: --timeout-header 0:"),
    (["--timeout-keep-alive", "-2"], "error: --timeout-keep-alive -2:"),
    (["--timeout-body", "nan"], "error: --timeout-body nan:"),
    (["--max-inflight-mb", "5"], "error: --max-inflight-mb 5 is below --max-upload-mb 20"),
    (["--max-connections", "100000000"], "error: --max-connections 100000000: this process may open"),
])
def test_serve_impossible_options_are_one_line(tmp_path, args, message):
    from typer.testing import CliRunner

    from mlic.cli import app

    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "nowhere"), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output


def test_serve_on_the_network_without_a_key_warns(tmp_path):
    from typer.testing import CliRunner

    from mlic.cli import app

    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "nowhere"), "--host", "0.0.0.0"])
    assert result.output.startswith("warning: --host 0.0.0.0 without --api-key: anyone who can reach")
    for args in (["--host", "0.0.0.0", "--api-key", "k"], ["--host", "127.0.0.1"], ["--host", "::1"]):
        result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "nowhere"), *args])
        assert "warning" not in result.output and "nowhere/model.json: not found" in result.output


def test_a_port_in_use_is_one_line():
    import socket

    from mlic.errors import MlicError

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(MlicError, match=f"--host 127.0.0.1 --port {port}: cannot bind .*pick another port"):
            serve_app.bind("127.0.0.1", port)
    sock = serve_app.bind("127.0.0.1", 0)  # 0: any free port, read back from the socket
    assert sock.getsockname()[1] > 0
    sock.close()
