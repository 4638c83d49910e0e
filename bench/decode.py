"""Decode benchmark: JPEG file -> normalised float batch (B, 3, 448, 448), images per second on one core.

Ours: ImageDataset(build_transform(448, train=False)) + collate + normalize (uint8 until the batch).
Baseline: the usual torchvision pipeline, PIL.Image.open().convert("RGB"), Resize((448, 448)), ToTensor,
Normalize per image, default_collate.

The images are synthetic 640x480 JPEGs (COCO's typical size) at quality 90: smooth colour gradients,
a few soft shapes and sensor-like noise, seeded. Both pipelines run in the same process, one thread
(``torch.set_num_threads(1)``), interleaved round by round; the best round of each is reported, as CPU
time (the per-core figure, robust to other load) and wall clock. A third line times ours up to the uint8
batch, which is the CPU's whole share in training (the engine normalises on the GPU).

With a CUDA device, a fourth line times ``--decode-device cuda``: the CPU reads each file's bytes, the GPU decodes
the batch (nvjpeg, one call), resizes and normalises it (:mod:`mlic.data.gpu_decode`); wall clock, with the
GPU synchronised at the end of each round, and the CPU time that path still costs. Without one, that line says
it was not measured.

``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's switch for transparent huge pages on large CPU tensors) cuts the
page-fault cost of every fresh batch; it speeds both pipelines.

    python bench/decode.py [--images 64] [--rounds 5] [--batch 32] [--size 448]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

from mlic.data.gpu_decode import collate_encoded, decode_batch, read_encoded
from mlic.data.images import ImageDataset, build_transform, collate, normalize
from mlic.data.labelset import LabelSet

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(folder: Path, count: int, seed: int = 0, width: int = 640, height: int = 480) -> list[str]:
    """Write ``count`` photo-like JPEGs (quality 90) and return their file names."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    names = []
    for i in range(count):
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (y / height)[..., None]
        img = top * (1 - t) + bottom * t + 40 * np.sin(x / rng.uniform(20, 90))[..., None]
        for _ in range(4):  # soft blobs: objects with smooth edges
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(30, 150)
            mask = np.exp(-(((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r)))[..., None]
            img = img * (1 - mask) + rng.uniform(0, 255, 3) * mask
        img += rng.normal(0, 6, img.shape)
        name = f"{i:05d}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / name, quality=90)
        names.append(name)
    return names


def run_ours(labelset: LabelSet, size: int, batch: int, normalise: bool = True) -> torch.Tensor:
    dataset = ImageDataset(labelset, build_transform(size, train=False))
    out = None
    for start in range(0, len(dataset), batch):
        images, _, _, _ = collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        out = normalize(images, MEAN, STD) if normalise else images
    return out


def run_ours_uint8(labelset: LabelSet, size: int, batch: int) -> torch.Tensor:
    """What the CPU does in training: the uint8 batch; the engine normalises it on the GPU."""
    return run_ours(labelset, size, batch, normalise=False)


def run_gpu(labelset: LabelSet, size: int, batch: int, device: str = "cuda") -> torch.Tensor:
    """``--decode-device``: the CPU reads bytes; decoding, resizing and normalising run on ``device``."""
    transform = build_transform(size, train=False)
    dataset = ImageDataset(labelset, transform, read=read_encoded)
    out = None
    for start in range(0, len(dataset), batch):
        items, _, rows, _ = collate_encoded([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        images, _, _ = decode_batch(items, rows, transform, device)
        out = normalize(images, MEAN, STD)
    if out is not None and out.is_cuda:
        torch.cuda.synchronize()
    return out


def run_baseline(labelset: LabelSet, size: int, batch: int) -> torch.Tensor:
    transform = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(MEAN, STD)])
    targets = torch.from_numpy(np.asarray(labelset.targets, dtype=np.float32))
    out = None
    for start in range(0, len(labelset), batch):
        rows = []
        for i in range(start, min(start + batch, len(labelset))):
            with Image.open(labelset.path(i)) as img:
                rows.append((transform(img.convert("RGB")), targets[i]))
        out = default_collate(rows)[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=448)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_jpegs(Path(tmp), args.images)
        labelset = LabelSet(["a"], names, np.zeros((len(names), 1), np.int8), root=tmp)
        pipelines = {"ours": run_ours, "torchvision": run_baseline, "ours, uint8": run_ours_uint8}
        if torch.cuda.is_available():
            pipelines["GPU decode"] = run_gpu
        outputs = {name: fn(labelset, args.size, args.batch) for name, fn in pipelines.items()}
        difference = (outputs["ours"] - outputs["torchvision"]).abs()
        cpu = dict.fromkeys(pipelines, float("inf"))
        wall = dict.fromkeys(pipelines, float("inf"))
        for _ in range(args.rounds):
            for name, fn in pipelines.items():
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                fn(labelset, args.size, args.batch)
                cpu[name] = min(cpu[name], time.process_time() - start_cpu)
                wall[name] = min(wall[name], time.perf_counter() - start_wall)
    print(f"{args.images} JPEGs 640x480 q90 -> normalised float batch {args.batch}x3x{args.size}x{args.size}, "
          f"1 thread, best of {args.rounds} rounds (images/s per core: CPU time; wall clock in brackets)")
    for name in ("ours", "torchvision"):
        print(f"{name:12s} {args.images / cpu[name]:7.1f}  ({args.images / wall[name]:.1f})")
    print(f"{'ratio':12s} {cpu['torchvision'] / cpu['ours']:7.2f}x ({wall['torchvision'] / wall['ours']:.2f}x)")
    name = "ours, uint8"
    print(f"without the CPU normalisation (training normalises the uint8 batch on the GPU): {name} "
          f"{args.images / cpu[name]:.1f} ({args.images / wall[name]:.1f}), "
          f"{cpu['torchvision'] / cpu[name]:.2f}x ({wall['torchvision'] / wall[name]:.2f}x) the baseline")
    print(f"output difference vs baseline (normalised units): mean {difference.mean():.4f}, "
          f"max {difference.max():.3f}")
    name = "GPU decode"
    if name not in outputs:
        print(f"{name} (--decode-device cuda): not measured (no GPU on this machine)")
        return
    gpu_difference = (outputs[name].cpu() - outputs["ours"]).abs()
    print(f"{name} (--decode-device cuda, {torch.cuda.get_device_name()}, batched nvjpeg + resize + normalise on "
          f"the GPU): {args.images / wall[name]:.1f} images/s wall clock; CPU time {args.images / cpu[name]:.1f} "
          f"images/s per core; {wall['ours'] / wall[name]:.2f}x ours (wall clock)")
    print(f"output difference GPU decode vs ours (normalised units): mean {gpu_difference.mean():.4f}, "
          f"max {gpu_difference.max():.3f}")


if __name__ == "__main__":
    main()
