"""Batch prediction speed: ``mlic predict`` over a folder of JPEGs, ONNX against eager PyTorch, int8's cost.

(a) images/s of ``mlic predict FOLDER --jsonl`` (the command itself, run as a subprocess; its own summary
    line, which leaves out the process start) for the torch and the onnx engine, against a plain loop:
    per image PIL open + convert + torchvision Resize + ToTensor + Normalize + a forward pass of one.
    The folder holds synthetic 640x480 JPEGs (bench/decode.py's, quality 90).
(b) forward passes only, uint8 batch in: onnxruntime (float32 and int8 dynamic quantization) against
    eager PyTorch float32 on the CPU, for the demo model (digitnet + linear, 64 px) and Query2Label R101
    at 448 (the released head shape; random weights, as speed does not depend on them).
(c) int8's mAP cost on MultiDigits' test split for a trained checkpoint (``--checkpoint``), float32
    ONNX against int8, same decoded images.

    PYTHONPATH=. python bench/predict_folder.py --checkpoint runs/demo [--images 2000] [--iters 5]
        [--skip-r101] [--threads 2] [--digits-size 400,100,100]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from mlic.config import ModelConfig
from mlic.engine.checkpoint import load_model, save_model
from mlic.export import export_onnx, ort_session
from mlic.models.classifier import build_model

sys.path.insert(0, str(Path(__file__).parent))
from decode import make_jpegs  # noqa: E402

R101_HEAD = {"hidden_dim": 2048, "dim_feedforward": 8192, "enc_layers": 1, "dec_layers": 2, "nheads": 4}


def run_predict(folder: Path, checkpoint: Path, out: Path, workers: int, batch: int) -> float:
    """images/s that ``mlic predict`` reports for itself."""
    cmd = [sys.executable, "-m", "mlic", "predict", str(folder), "--checkpoint", str(checkpoint), "--jsonl",
           str(out), "--workers", str(workers), "--batch-size", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"\(([\d.]+) images/s\)", proc.stderr)
    if proc.returncode or not found:
        raise SystemExit(f"mlic predict failed: {proc.stderr[-500:]}")
    return float(found.group(1))


def plain_loop(paths: list[Path], model: torch.nn.Module) -> float:
    """images/s of the loop a user writes first: one image at a time, PIL and torchvision transforms."""
    cfg = model.config
    tf = T.Compose([T.Resize((cfg.img_size, cfg.img_size)), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            torch.sigmoid(model(tf(Image.open(p).convert("RGB")).unsqueeze(0)))
    return len(paths) / (time.perf_counter() - t0)


def forward_speed(model: torch.nn.Module, out_dir: Path, batch: int, iters: int, name: str) -> dict:
    """images/s of eager PyTorch, onnxruntime float32 and int8 on one uint8 batch (best of ``iters``)."""
    from mlic.export import ProbabilityGraph

    size = model.config.img_size
    t0 = time.perf_counter()
    result = export_onnx(model, {"classes": [str(k) for k in range(model.config.num_classes)]},
                         out_dir / f"{name}.onnx", int8=True)
    print(f"  {name}: exported + checked + quantized in {time.perf_counter() - t0:.0f}s; parity {result.max_diff:.1e}",
          flush=True)
    images = np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
    graph = ProbabilityGraph(model).eval()
    runners = {"torch eager fp32": lambda: graph(torch.from_numpy(images))}
    for label, path in (("onnxruntime fp32", result.path), ("onnxruntime int8", result.int8_path)):
        session = ort_session(path)
        runners[label] = lambda s=session: s.run(["probabilities"], {"images": images})
    best = {}
    with torch.no_grad():
        for _ in range(iters):  # interleaved, so other load hits all alike
            for label, fn in runners.items():
                t = time.perf_counter()
                fn()
                best[label] = min(best.get(label, 1e9), time.perf_counter() - t)
    return {label: batch / seconds for label, seconds in best.items()}


def int8_map_cost(checkpoint: Path, out_dir: Path, batch: int, digits_size: str | None) -> tuple[float, float, int]:
    """mAP of the float32 and the int8 ONNX graphs on MultiDigits' test split (images decoded once)."""
    from mlic.data.digits import DigitsSpec, build_multidigits
    from mlic.engine.evaluate import evaluate_scores
    from mlic.engine.predict import Predictor

    model, meta = load_model(checkpoint)
    result = export_onnx(model, meta, out_dir / "ckpt.onnx", int8=True)
    spec = DigitsSpec(*(int(v) for v in digits_size.split(","))) if digits_size else DigitsSpec()
    test = build_multidigits(spec=spec)["test"]
    maps = []
    for path in (result.path, result.int8_path):
        predictor = Predictor(path)
        scores = np.concatenate([np.stack([p.scores for p in b]) for b in predictor.stream(test, batch, workers=2)])
        maps.append(evaluate_scores(scores, test.targets)["mAP"])
    return maps[0], maps[1], len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="trained run for (a) and (c); default: untrained demo model")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--r101-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip-r101", action="store_true")
    parser.add_argument("--digits-size", help="TRAIN,VAL,TEST of the MultiDigits the checkpoint was trained on")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="mlic-bench-predict-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / "demo"
        config = ModelConfig()
        save_model(checkpoint, build_model(config), config, [str(k) for k in range(config.num_classes)])
    model, _ = load_model(checkpoint)

    folder = work / "jpegs"
    folder.mkdir()
    t0 = time.perf_counter()
    make_jpegs(folder, args.images)
    paths = sorted(folder.glob("*.jpg"))
    print(f"{len(paths)} JPEGs of 640x480 written in {time.perf_counter() - t0:.0f}s; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    print("(a) whole pipeline, decode to labels", flush=True)
    export_onnx(model, {"classes": [str(k) for k in range(model.config.num_classes)]}, work / "demo.onnx")
    rows = {"mlic predict --engine torch": run_predict(folder, checkpoint, work / "t.jsonl", args.workers, args.batch),
            "mlic predict --engine onnx": run_predict(folder, work / "demo.onnx", work / "o.jsonl", args.workers,
                                                      args.batch),
            "plain loop (PIL + torchvision, 1 image)": plain_loop(paths[: min(len(paths), 500)], model)}
    for label, speed in rows.items():
        print(f"  {label:42s} {speed:8.1f} images/s", flush=True)
    plain = rows["plain loop (PIL + torchvision, 1 image)"]
    print(f"  ratio mlic predict (torch) / plain loop: {rows['mlic predict --engine torch'] / plain:.2f}x")

    print("(b) forward passes only, uint8 batch in", flush=True)
    cases = [("demo digitnet+linear 64px", model, args.batch)]
    if not args.skip_r101:
        config = ModelConfig(backbone="resnet101", head="query2label", num_classes=80, img_size=448,
                             head_args=R101_HEAD)
        cases.append(("Query2Label R101 448px", build_model(config).eval(), args.r101_batch))
    for name, net, batch in cases:
        speeds = forward_speed(net, work, batch, args.iters, name.split()[0] + ("_r101" if "R101" in name else ""))
        base = speeds["torch eager fp32"]
        print(f"  {name} (batch {batch}): " + "; ".join(f"{k} {v:.1f} img/s ({v / base:.2f}x)"
                                                         for k, v in speeds.items()), flush=True)

    if args.checkpoint is not None:
        fp32, int8, n = int8_map_cost(args.checkpoint, work, args.batch, args.digits_size)
        print(f"(c) MultiDigits test ({n} images), mAP: onnx fp32 {fp32:.2f}, int8 {int8:.2f} "
              f"(cost {fp32 - int8:+.2f} points)")


if __name__ == "__main__":
    main()
