"""Time and peak memory of `mlic prepare openimages` on a synthetic OpenImages-size label file.

Writes, into ``--workdir``, a tree laid out as the official download: a class-description file
with ``--classes`` classes and a train label file with ``--images`` images and ``--rows`` rows
(default 9,000,000 images and 60,000,000 rows: OpenImages V6's human-verified train labels are
of that order), rows grouped by ImageID in ascending order as in the official files, each image
with distinct classes, Confidence 1 or 0. Then, each in a fresh process so its peak memory is its
own, it runs

* prepare: ``mlic.data.prepare.prepare("openimages", ...)`` (read + write the sparse LabelSet);
* load: ``LabelSet.load`` and reading 10,000 random rows as dense (K,) vectors, as a batch does,

and prints wall time and peak resident memory (``ru_maxrss``) of each, plus the sizes on disk.

    python bench/openimages_prepare.py --workdir /tmp/oi-bench --images 1000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
LINE = 16 + 1 + 12 + 1 + 9 + 1 + 1 + 1  # ImageID,verification,/m/cNNNNN,C\n


def label_name(k: np.ndarray) -> np.ndarray:
    """Fixed-width LabelNames ``/m/c`` + 5 decimal digits, as (len(k), 9) bytes."""
    out = np.empty((k.size, 9), np.uint8)
    out[:, :4] = np.frombuffer(b"/m/c", np.uint8)
    for d in range(5):
        out[:, 8 - d] = ord("0") + (k // 10**d) % 10
    return out


def generate(root: Path, images: int, rows: int, classes: int, seed: int = 0) -> int:
    """The class descriptions and the train label file, written in chunks of fixed-width lines; returns the rows."""
    root.mkdir(parents=True, exist_ok=True)
    names = label_name(np.arange(classes))
    with open(root / "oidv6-class-descriptions.csv", "wb") as f:
        f.write(b"LabelName,DisplayName\n")
        f.write(b"".join(bytes(n) + b",class " + str(k).encode() + b"\n" for k, n in enumerate(names)))
    rng = np.random.default_rng(seed)
    per_image = rows / images
    chunk = 200_000
    written = 0
    with open(root / "oidv6-train-annotations-human-imagelabels.csv", "wb") as f:
        f.write(b"ImageID,Source,LabelName,Confidence\n")
        for start in range(0, images, chunk):
            n = min(chunk, images - start)
            # rows per image around the target mean, at least 1; the last chunk tops up to the exact row count
            counts = np.maximum(rng.poisson(per_image - 1, n) + 1, 1)
            if start + n == images:
                counts[-1] = max(1, rows - written - int(counts[:-1].sum()))
            image = np.repeat(np.arange(start, start + n, dtype=np.uint64), counts)
            j = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            first = np.repeat(rng.integers(0, classes, n), counts)
            k = (first + j * 7919) % classes  # distinct within an image (7919 is prime, counts < classes)
            out = np.empty((image.size, LINE), np.uint8)
            image_id = image * np.uint64(2654435761)  # ascending with the index, spread over 16 hex digits
            for d in range(16):
                out[:, d] = HEX[((image_id >> np.uint64(4 * (15 - d))) & np.uint64(15)).astype(np.int64)]
            out[:, 16] = ord(",")
            out[:, 17:29] = np.frombuffer(b"verification", np.uint8)
            out[:, 29] = ord(",")
            out[:, 30:39] = label_name(k)
            out[:, 39] = ord(",")
            out[:, 40] = ord("0") + (rng.random(image.size) < 0.6)
            out[:, 41] = ord("\n")
            f.write(out.tobytes())
            written += image.size
    return written


PREPARE = """
import sys, time
from mlic.data.prepare import prepare
t = time.perf_counter()
prepare("openimages", sys.argv[1], sys.argv[2], progress=False)
print(f"{time.perf_counter() - t:.1f}")
"""

LOAD = """
import sys, time
import numpy as np
from mlic.data.labelset import LabelSet
t = time.perf_counter()
ls = LabelSet.load(sys.argv[1] + "/train")
rows = np.random.default_rng(0).integers(0, len(ls), 10_000)
positives = 0
for i in rows:  # one dense (K,) row at a time, as ImageDataset.__getitem__ reads them
    row = ls.targets[int(i)]
    positives += int((row == 1).sum())
assert row.shape == (ls.num_classes,) and positives > 0
print(f"{time.perf_counter() - t:.1f} {len(ls)} {ls.num_classes} {ls.targets.nnz} {ls.sparse}")
"""


BASELINE = """
import mlic.data.prepare
"""


def run_measured(code: str, *args: str) -> tuple[str, float]:
    """Run ``code`` in a fresh interpreter; its stdout and its own peak RSS in MiB (from ``wait4``).

    Linux folds the spawning process's peak into a child's ``ru_maxrss`` at exec, so the caller keeps
    itself small: the generator runs in a child process too.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode:
            sys.exit(err.read().decode())
        return out.read().decode().strip(), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="temporary folder (removed at the end)")
    parser.add_argument("--images", type=int, default=9_000_000)
    parser.add_argument("--rows", type=int, default=None, help="default: images x 60/9")
    parser.add_argument("--classes", type=int, default=20_000)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = args.rows or round(args.images * 60 / 9)
    root, out = args.workdir / "OI", args.workdir / "prepared"
    if args.generate_only:
        print(generate(root, args.images, rows, args.classes))
        return
    t = time.perf_counter()
    rows = int(subprocess.run([sys.executable, __file__, "--generate-only", "--workdir", str(args.workdir),
                               "--images", str(args.images), "--rows", str(rows), "--classes", str(args.classes)],
                              check=True, capture_output=True, text=True).stdout)
    csv_bytes = (root / "oidv6-train-annotations-human-imagelabels.csv").stat().st_size
    print(f"generated {args.images:,} images, {rows:,} rows, {args.classes:,} classes: "
          f"{csv_bytes / 2**30:.2f} GiB CSV in {time.perf_counter() - t:.0f} s")
    try:
        _, peak = run_measured(BASELINE)
        print(f"baseline (python + mlic.data.prepare imported): peak RSS {peak:.0f} MiB")
        seconds, peak = run_measured(PREPARE, str(root), str(out))
        disk = {p.name: p.stat().st_size for p in (out / "train").iterdir()}
        print(f"prepare: {seconds} s, peak RSS {peak:.0f} MiB "
              f"({rows / float(seconds) / 1e6:.2f} M rows/s)")
        print("  on disk: " + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sorted(disk.items())))
        result, peak = run_measured(LOAD, str(out))
        seconds, n, k, nnz, sparse = result.split()
        print(f"load + 10,000 random dense rows: {seconds} s, peak RSS {peak:.0f} MiB "
              f"(N={int(n):,}, K={int(k):,}, known={int(nnz):,}, sparse={sparse}; "
              f"dense would be {int(n) * int(k) / 2**30:.1f} GiB)")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
