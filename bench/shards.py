"""Streaming from WebDataset shards vs reading the image folder: images per second into uint8 batches.

Both paths decode through ``read_image`` with the same training transform (light augmentation) and batch
through ``collate``. Folder: ``ImageDataset`` + ``make_loader(shuffle=True)``; folder+seeds: the same in the
training loop's ``EpochOrder`` (a torch seed per sample); shards: ``ShardDataset`` (shuffle buffer 1000, a seed
per sample) + the same DataLoader settings. Two data sets: MultiDigits (64 px PNGs,
built into ``$MLIC_CACHE``) and synthetic 640x480 JPEGs (bench/decode.py's) at ``--size``. Each path runs
``--rounds`` epochs, interleaved; the best epoch of each is reported, by wall clock and (workers 0) by CPU
time of the process, the per-core figure that other load on a shared machine disturbs least.
Also reported: the time ``write_shards`` took, the shard bytes against the image bytes, and the CPU time per
sample that streaming adds before decoding (tar reading and the labels entry).

    python bench/shards.py [--digits 4000] [--jpegs 400] [--size 224] [--workers 0] [--rounds 3] [--shard-mib 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import make_jpegs  # noqa: E402

from mlic.data.digits import DigitsSpec, build_multidigits  # noqa: E402
from mlic.data.images import EpochOrder, ImageDataset, build_transform, collate, make_loader  # noqa: E402
from mlic.data.labelset import LabelSet  # noqa: E402
from mlic.data.shards import ShardDataset, decode_row, write_shards  # noqa: E402


def epoch_rate(loader) -> tuple[float, float]:
    """Images per second of one pass: by wall clock, and by this process's CPU time (workers 0 only)."""
    start, cpu, count = time.perf_counter(), time.process_time(), 0
    for _, _, indices, _ in loader:
        count += len(indices)
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu)


def compare(name: str, labelset: LabelSet, size: int, workers: int, rounds: int, batch: int, tmp: Path,
            shard_mib: float) -> None:
    start = time.perf_counter()
    shards = write_shards(labelset, tmp / name, shard_size_bytes=int(shard_mib * 2**20), progress=False)
    written = time.perf_counter() - start
    image_bytes = sum(labelset.path(i).stat().st_size for i in range(len(labelset)))
    shard_bytes = sum(p.stat().st_size for p in shards)
    transform = build_transform(size, train=True, augment="light")
    folder = make_loader(ImageDataset(labelset, transform), batch, shuffle=True, workers=workers)
    order = EpochOrder(len(labelset), seed=0)  # the training loop's order: a seed per sample, as shards use
    seeded = make_loader(ImageDataset(labelset, transform), batch, workers=workers, sampler=order)
    stream = ShardDataset(tmp / name, transform, seed=0)
    streamed = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=collate,
                                           persistent_workers=workers > 0)
    rates = {"folder": [], "folder+seeds": [], "shards": []}
    for epoch in range(rounds):
        rates["folder"].append(epoch_rate(folder))
        order.set_epoch(epoch)
        rates["folder+seeds"].append(epoch_rate(seeded))
        stream.set_epoch(epoch)
        rates["shards"].append(epoch_rate(streamed))
    print(f"{name}: {len(labelset)} images, {image_bytes / 2**20:.1f} MiB of files -> {len(shards)} shards "
          f"{shard_bytes / 2**20:.1f} MiB in {written:.2f} s; img_size {size}, workers {workers}, batch {batch}, "
          f"best of {rounds} epochs each")
    for column, label in ((0, "wall"), (1, "cpu ")):
        if column == 1 and workers:  # with workers the decoding is not in this process
            continue
        best = {k: max(r[column] for r in v) for k, v in rates.items()}
        print(f"  {label}  " + "   ".join(f"{k} {v:6.0f} images/s" for k, v in best.items()) +
              f"   shards/folder {best['shards'] / best['folder']:.2f}")
    start, count = time.process_time(), 0
    for shard in range(len(stream.index.shards)):  # what streaming adds per sample: tar reading and labels, no decode
        for _, _, entry in stream._read_shard(shard):
            decode_row(entry["targets"], labelset.num_classes)
            count += 1
    print(f"  shard reading without decoding: {(time.process_time() - start) / count * 1e3:.3f} ms CPU per sample")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=4000, help="MultiDigits training images")
    parser.add_argument("--jpegs", type=int, default=400, help="synthetic 640x480 JPEGs")
    parser.add_argument("--size", type=int, default=224, help="img_size for the JPEGs (MultiDigits: 64)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-mib", type=float, default=4.0, help="shard size; several shards per worker")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.digits:
            digits = build_multidigits(spec=DigitsSpec(train=args.digits, val=100, test=100))["train"]
            compare("multidigits", digits, 64, args.workers, args.rounds, args.batch, tmp, args.shard_mib)
        if args.jpegs:
            (tmp / "jpg").mkdir()
            names = make_jpegs(tmp / "jpg", args.jpegs)
            targets = np.random.default_rng(0).integers(0, 2, (len(names), 10)).astype(np.int8)
            photos = LabelSet([f"c{k}" for k in range(10)], names, targets, str(tmp / "jpg"), "train")
            compare("jpeg640x480", photos, args.size, args.workers, args.rounds, args.batch, tmp, args.shard_mib)


if __name__ == "__main__":
    main()
