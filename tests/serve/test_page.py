"""The web page in a real browser: Playwright drives Debian's Chromium against a live ``mlic serve``.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; Playwright's own browser download is not
used). Set ``MLIC_SCREENSHOT=path.png`` to keep the page's screenshot.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium) for the browser "
                "test", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install -e '.[deploy]')")

from mlic.config import ModelConfig  # noqa: E402
from mlic.engine.checkpoint import save_model  # noqa: E402
from mlic.engine.predict import Predictor  # noqa: E402
from mlic.models.classifier import build_model  # noqa: E402
from mlic.serve.app import create_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    torch.manual_seed(0)
    config = ModelConfig(num_classes=3, img_size=32, head="query2label",
                         head_args={"hidden_dim": 32, "dim_feedforward": 64, "nheads": 2})
    save_model(root / "run", build_model(config), config, ["cat", "dog", "bird"], thresholds=[0.0, 0.5, 1.0])
    predictor = Predictor(root / "run")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    image = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    yield f"http://127.0.0.1:{port}", image, predictor
    server.should_exit = True
    thread.join(10)


def test_upload_shows_labels_thresholds_and_attention(server, tmp_path):
    url, image, predictor = server
    expected = predictor.predict([image])[0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 520})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('3 classes')")
        page.set_input_files("#files", str(image))
        page.wait_for_selector(".card li.label", timeout=20000)
        rows = page.eval_on_selector_all(
            ".card li.label", "els => els.map(e => [e.dataset.label, e.classList.contains('on'), "
                              "parseFloat(e.querySelector('.score').textContent)])")
        scores = dict(zip(predictor.classes, expected.scores))
        assert [r[0] for r in rows] == sorted(scores, key=lambda c: -scores[c])  # best first
        for label, on, shown in rows:
            assert abs(shown - scores[label]) <= 1e-3
            assert on == (label in [c for c, _ in expected.labels])  # per-class thresholds: cat 0, bird 1
        assert page.text_content(".card .name") == "photo.png"
        # the attention overlay was drawn (a Query2Label model)
        alpha = page.evaluate("() => { const c = document.querySelector('.card canvas');"
                              " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                              " let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i]; return s; }")
        assert alpha > 0
        shot = Path(os.environ.get("MLIC_SCREENSHOT") or tmp_path / "page.png")
        page.screenshot(path=str(shot), full_page=True)
        # one global threshold of 0 from the slider: every label is on
        page.uncheck("#per-class")
        page.eval_on_selector("#threshold", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
        assert page.eval_on_selector_all(".card li.label", "els => els.every(e => e.classList.contains('on'))")
        # a non-image is refused with the service's message on the page, and the page keeps working
        junk = tmp_path / "notes.png"
        junk.write_bytes(b"not an image at all")
        page.set_input_files("#files", str(junk))
        page.wait_for_function("document.getElementById('status').textContent.includes('not in a format mlic reads')")
        browser.close()
    assert shot.read_bytes()[:4] == b"\x89PNG"
