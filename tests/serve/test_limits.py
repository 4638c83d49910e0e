"""`mlic serve` as a process under hostile clients: memory stays within the stated bound while many high-pixel
uploads decode at once and is given back afterwards; idle and trickling connections are closed, never keep
/healthz out. Each test starts the real command on 127.0.0.1, port 0, and stops it."""

from __future__ import annotations

import http.client
import io
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install -e '.[deploy]')")

from mlic.config import ModelConfig  # noqa: E402
from mlic.engine.checkpoint import save_model  # noqa: E402
from mlic.models.classifier import build_model  # noqa: E402
from mlic.serve.app import ServeConfig  # noqa: E402

PROC = Path("/proc/self/status")
needs_proc = pytest.mark.skipif(not PROC.exists(), reason="reads the server's memory from /proc (Linux)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    torch.manual_seed(0)
    config = ModelConfig(num_classes=3, img_size=32, head="linear")
    save_model(root / "run", build_model(config), config, ["x", "y", "z"], thresholds=[0.5, 0.5, 0.5])
    return root / "run"


class Server:
    """``mlic serve --port 0 ARGS`` in a subprocess; the port is read from its start line (60 s at most)."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mlic", "serve", "--checkpoint", str(checkpoint),
                                      "--port", "0", *args], stderr=subprocess.PIPE, text=True)
        self.port = None
        lines = []
        deadline = time.monotonic() + 60
        while self.port is None and time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stderr], [], [], 1)[0]:
                lines.append(self.proc.stderr.readline())
                found = re.search(r"http://127\.0\.0\.1:(\d+)/", lines[-1])
                self.port = int(found.group(1)) if found else None
        if self.port is None:
            self.stop()
            raise AssertionError(f"mlic serve did not start: {''.join(lines)}")

    def status(self, key: str) -> float:
        """A /proc/PID/status figure of the server, in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post_file(self, name: str, data: bytes, timeout: float = 120.0) -> tuple[int, bytes]:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            connection.request("POST", "/v1/predict", body, headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stderr.close()


@pytest.fixture
def serve(model_dir):
    started = []

    def start(*args: str) -> Server:
        started.append(Server(model_dir, *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def encoded(mode: str, size: tuple[int, int], fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt, **options)
    return buffer.getvalue()


@needs_proc
def test_concurrent_high_pixel_uploads_stay_within_the_stated_memory_bound(serve):
    config = ServeConfig()  # the defaults the docs state the bound for
    side = int(config.max_pixels ** 0.5)  # 5000 x 5000: the most pixels the default lets through
    uploads = {"bomb.png": encoded("RGBA", (side, side), "PNG"),  # 8 bytes a pixel to decode, 100 kB to send
               "bomb.webp": encoded("RGBA", (side, side), "WEBP", lossless=True)}  # 16 bytes a pixel, 1 kB
    assert max(len(d) for d in uploads.values()) < 200_000
    server = serve()
    assert server.post_file("warm.png", encoded("RGB", (64, 48), "PNG"))[0] == 200  # torch's first-call setup
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # VmHWM from here on
    idle = server.status("VmRSS")
    results = []
    threads = [threading.Thread(target=lambda n=name: results.append(server.post_file(n, uploads[n])))
               for name in list(uploads) * 4]  # eight at once: without the decode pool, eight decodes at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert [status for status, _ in results] == [200] * 8, results
    peak = server.status("VmHWM") - idle
    assert peak <= config.worst_case_mb(), f"peak {peak:.0f} MB over the stated {config.worst_case_mb():.0f} MB"
    # the decodes' memory goes back to the OS (malloc_trim), not kept by the allocator's arenas
    time.sleep(0.5)
    kept = server.status("VmRSS") - idle
    assert kept < 64, f"{kept:.0f} MB still resident after the uploads"


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (nothing is ever sent on it, so readable means closed)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:  # reset: the server aborted it
        return True


def test_idle_connections_are_capped_timed_out_and_never_keep_healthz_out(serve):
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap, total = 100, min(400, soft // 2 - 64)
    assert total > cap, f"the open-file limit ({soft}) is too low for this test"
    server = serve("--max-connections", str(cap), "--timeout-header", "2", "--timeout-keep-alive", "1")
    held = []
    try:
        for _ in range(cap - 20):  # under the cap: nothing to evict, /healthz answers beside them
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        start = time.monotonic()
        assert server.get("/healthz", timeout=5) == (200, b'{"status":"ok"}')
        assert time.monotonic() - start < 2
        for _ in range(total - len(held)):  # over the cap: every new one closes the longest-idle one
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        for _ in range(3):
            start = time.monotonic()
            assert server.get("/healthz", timeout=5)[0] == 200
            assert time.monotonic() - start < 2
        deadline = time.monotonic() + 1.5
        while sum(map(closed, held)) < total - cap and time.monotonic() < deadline:
            time.sleep(0.05)
        evicted = [closed(s) for s in held]
        assert sum(evicted) >= total - cap
        assert any(evicted[:50]) and not all(evicted[-20:])  # the oldest go first
        # a client that trickles its request head a byte at a time is still held to the header timeout
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        opened = time.monotonic()
        while time.monotonic() - opened < 6:
            try:
                slow.sendall(b"X")
            except OSError:
                break
            if closed(slow):
                break
            time.sleep(0.2)
        assert 1.5 < time.monotonic() - opened < 4.5, "the trickling connection was not closed at --timeout-header"
        held.append(slow)
        # and every idle one is gone after the header timeout
        deadline = time.monotonic() + 5
        while not all(map(closed, held)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(closed(s) for s in held)
        # a keep-alive connection is closed --timeout-keep-alive after its response
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b'{"status":"ok"}'
        time.sleep(1.8)
        assert closed(connection.sock)
        connection.close()
    finally:
        for sock in held:
            sock.close()
