"""MultiDigits: the embedded default data set, built from scikit-learn's bundled digit scans.

Each image is a noisy coloured canvas holding 1–4 handwritten digits (the 8×8 scans of
``sklearn.datasets.load_digits``, upscaled) at random scales, positions and colours. The label
of an image is the set of digits on it: 10 classes, "0" … "9". Class frequencies are
imbalanced (``CLASS_WEIGHTS``) and two pairs co-occur (a 3 usually brings an 8, a 1 a 7), so the
data has the traits that make multi-label learning interesting. Train, val and test draw their
digits from disjoint sets of scans.

The data set is written once into a cache folder (PNG files plus one LabelSet per split) and
reused; the folder name encodes every parameter, so a different seed or size builds anew.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mlic.data.labelset import LabelSet
from mlic.io import check_writable, folder_swap

CLASSES = [str(d) for d in range(10)]
CLASS_WEIGHTS = np.array([1.0, 2.6, 1.4, 1.8, 0.7, 0.5, 1.2, 1.0, 0.6, 0.35])
"""Relative frequency of each digit as the first pick of an image (imbalanced on purpose)."""
CO_OCCURRENCE = {3: (8, 0.7), 1: (7, 0.5)}
"""digit -> (partner, probability that the partner is added when the digit is present)."""


@dataclass(frozen=True)
class DigitsSpec:
    """Parameters of a MultiDigits build; all of them enter the cache key."""

    train: int = 4000
    val: int = 1000
    test: int = 2000
    img_size: int = 64
    seed: int = 0
    draw_seed: int = 0
    """Seed of the image compositions; another value draws new images from the same split of scans
    (e.g. a pretraining set whose test scans stay unseen)."""
    version: int = 1

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def default_cache_dir() -> Path:
    """``$MLIC_CACHE`` or ``~/.cache/mlic``."""
    return Path(os.environ.get("MLIC_CACHE", Path.home() / ".cache" / "mlic"))


def split_scans(labels: np.ndarray, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """Disjoint scan indices per split (60/20/20 within each digit)."""
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for d in range(10):
        idx = rng.permutation(np.nonzero(labels == d)[0])
        a, b = int(0.6 * len(idx)), int(0.8 * len(idx))
        parts["train"].append(idx[:a])
        parts["val"].append(idx[a:b])
        parts["test"].append(idx[b:])
    return {k: np.concatenate(v) for k, v in parts.items()}


def draw_digit_set(rng: np.random.RandomState) -> list[int]:
    """1–4 distinct digits with imbalanced frequencies and the co-occurring pairs."""
    count = rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.25, 0.1])
    p = CLASS_WEIGHTS / CLASS_WEIGHTS.sum()
    digits: list[int] = []
    while len(digits) < count:
        d = int(rng.choice(10, p=p))
        if d in digits:
            continue
        digits.append(d)
        partner, prob = CO_OCCURRENCE.get(d, (None, 0.0))
        if partner is not None and partner not in digits and len(digits) < 4 and rng.rand() < prob:
            digits.append(partner)
    return digits


def render(digits: list[int], scans: np.ndarray, pools: dict[int, np.ndarray], size: int,
           rng: np.random.RandomState) -> np.ndarray:
    """One (size, size, 3) uint8 canvas with the given digits pasted on a noisy background."""
    base = rng.uniform(0, 255, size=3)
    gradient = np.linspace(0, 1, size)[None, :, None] * rng.uniform(-60, 60, size=3)
    canvas = base + gradient + rng.normal(0, 18, size=(size, size, 3))
    boxes: list[tuple[int, int, int]] = []
    for d in digits:
        scan = scans[rng.choice(pools[d])]
        for _ in range(30):  # find a place overlapping the others little
            s = int(rng.randint(size * 0.3, size * 0.5))
            x, y = rng.randint(0, size - s + 1, size=2)
            if all(abs(x - bx) > 0.7 * (s + bs) / 2 or abs(y - by) > 0.7 * (s + bs) / 2 for bx, by, bs in boxes):
                break
        boxes.append((x, y, s))
        alpha = np.asarray(Image.fromarray((scan * 255 / 16).astype(np.uint8)).resize((s, s), Image.BILINEAR))
        alpha = alpha.astype(np.float64)[..., None] / 255.0
        colour = 255 - base + rng.uniform(-40, 40, size=3)  # contrasting with the background
        patch = canvas[y:y + s, x:x + s]
        canvas[y:y + s, x:x + s] = patch * (1 - alpha) + colour.clip(0, 255) * alpha
    return canvas.clip(0, 255).astype(np.uint8)


def build_split(split: str, n: int, spec: DigitsSpec, scans: np.ndarray, scan_labels: np.ndarray,
                scan_idx: np.ndarray, root: Path, seed_offset: int) -> LabelSet:
    rng = np.random.RandomState(spec.seed * 1000 + seed_offset + 7919 * spec.draw_seed)
    pools = {d: scan_idx[scan_labels[scan_idx] == d] for d in range(10)}
    targets = np.zeros((n, 10), dtype=np.int8)
    paths = []
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        digits = draw_digit_set(rng)
        targets[i, digits] = 1
        rel = f"images/{split}/{i:06d}.png"
        Image.fromarray(render(digits, scans, pools, spec.img_size, rng)).save(root / rel, compress_level=1)
        paths.append(rel)
    return LabelSet(CLASSES, paths, targets, root=str(root), split=split, meta={"dataset": "multidigits"})


def build_multidigits(cache_dir: str | Path | None = None, spec: DigitsSpec | None = None) -> dict[str, LabelSet]:
    """Build (or reuse) MultiDigits; returns {"train", "val", "test"} LabelSets.

    The folder is built under a temporary name and swapped in when complete, so an interrupted build
    never leaves a half data set behind; the temporary folders of interrupted builds are removed on
    the next call.
    """
    from sklearn.datasets import load_digits

    spec = spec or DigitsSpec()
    chosen = "the cache_dir argument" if cache_dir else "MLIC_CACHE" if os.environ.get("MLIC_CACHE") else \
        "MLIC_CACHE (default ~/.cache/mlic)"
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    name = f"multidigits-{spec.key()}"
    final = cache_dir / name
    if not (final / "done").exists():
        check_writable(cache_dir, chosen)
        digits = load_digits()
        scans, scan_labels = digits.images, digits.target
        split_idx = split_scans(scan_labels, np.random.RandomState(spec.seed))
        # another process may finish first: its complete folder is kept; a stale one without 'done' is replaced
        with folder_swap(final, keep_existing=lambda f: (f / "done").exists()) as tmp:
            for offset, split in enumerate(("train", "val", "test")):
                n = getattr(spec, split)
                ls = build_split(split, n, spec, scans, scan_labels, split_idx[split], tmp, offset)
                ls.save(tmp / split)
            (tmp / "spec.json").write_text(json.dumps(asdict(spec)))
            (tmp / "done").write_text("ok\n")
    return {split: LabelSet.load(final / split) for split in ("train", "val", "test")}
