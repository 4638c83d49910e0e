"""Load test of ``mlic serve``: concurrent clients on loopback, with server-side batching on and off.

Starts ``mlic serve`` as a subprocess (the small demo model: digitnet + linear, 64 px, untrained unless
``--checkpoint`` is given; speed does not depend on the weights), lets ``--clients`` asyncio clients each
POST one 640x480 JPEG to /v1/predict in a loop for ``--seconds``, and reports total requests, errors,
p50/p99 latency and images/s. Then the same with batching off (``--max-batch 1``), and the ratio.
Clients and server share the machine: on a small CPU the clients' own cost lowers both figures alike.

    PYTHONPATH=. python bench/serve_load.py [--clients 64] [--seconds 30] [--max-batch 32] [--max-wait-ms 5]
        [--checkpoint RUN | --backbone resnet18 --img-size 224] [--upload-size 640x480]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg(width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                     Image.BILINEAR)
    buffer = io.BytesIO()
    coarse.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def load(url: str, clients: int, seconds: float, image: bytes) -> dict:
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one_client():
            nonlocal errors
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await client.post(url + "/v1/predict", files={"file": ("x.jpg", image, "image/jpeg")})
                    kind = "ok" if r.status_code == 200 and len(r.json()["results"]) == 1 else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    kind = type(e).__name__
                if kind == "ok":
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
                    kinds[kind] = kinds.get(kind, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies) + errors, "errors": errors, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "images_s": len(latencies) / wall, "error_kinds": kinds}


def serve(checkpoint: Path, port: int, max_batch: int, max_wait_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlic", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlic serve did not come up in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--backbone", default="digitnet", help="backbone of the generated model (no --checkpoint)")
    parser.add_argument("--img-size", type=int, default=64, help="input size of the generated model")
    parser.add_argument("--upload-size", default="640x480", help="WIDTHxHEIGHT of the uploaded JPEG")
    args = parser.parse_args()
    checkpoint = args.checkpoint
    if checkpoint is None:
        from mlic.config import ModelConfig
        from mlic.engine.checkpoint import save_model
        from mlic.models.classifier import build_model

        checkpoint = Path(tempfile.mkdtemp(prefix="mlic-bench-serve-")) / "demo"
        config = ModelConfig(backbone=args.backbone, img_size=args.img_size)
        save_model(checkpoint, build_model(config), config, [str(k) for k in range(config.num_classes)])
    image = jpeg(*(int(v) for v in args.upload_size.split("x")))
    results = {}
    for label, max_batch in ((f"batching on (max batch {args.max_batch}, wait {args.max_wait_ms:g} ms)",
                              args.max_batch), ("batching off (max batch 1)", 1)):
        port = free_port()
        proc = serve(checkpoint, port, max_batch, args.max_wait_ms)
        try:
            asyncio.run(load(f"http://127.0.0.1:{port}", args.clients, 2, image))  # warm-up
            before = httpx.get(f"http://127.0.0.1:{port}/v1/model").json()["served"]
            results[label] = r = asyncio.run(load(f"http://127.0.0.1:{port}", args.clients, args.seconds, image))
            after = httpx.get(f"http://127.0.0.1:{port}/v1/model").json()["served"]
            r["mean_batch"] = (after["images"] - before["images"]) / max(1, after["forward_passes"]
                                                                         - before["forward_passes"])
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"{label:42s} requests {r['requests']:6d}  errors {r['errors']}  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  {r['images_s']:7.1f} images/s  mean batch {r['mean_batch']:.1f}"
              + (f"  errors: {r['error_kinds']}" if r["errors"] else ""), flush=True)
    on, off = results.values()
    print(f"model {checkpoint}; upload {args.upload_size} JPEG ({len(image) / 1000:.0f} kB)")
    print(f"{args.clients} clients, {args.seconds:g} s each, {os.cpu_count()} CPUs shared by clients and server; "
          f"images/s batching on / off: {on['images_s'] / off['images_s']:.2f}x")


if __name__ == "__main__":
    main()
