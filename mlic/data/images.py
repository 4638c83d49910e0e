"""Image decoding, transforms and the Dataset every trainer reads.

Images stay uint8 until they are batched; normalisation happens once per batch
(:func:`normalize`), on whatever device the batch is on.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mlic.data.labelset import LabelSet


class ImageError(ValueError):
    """An image cannot be read; the message names the file."""


def load_image(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode an image file to RGB, honouring EXIF orientation.

    Args:
        path: image file.
        min_size: if given, JPEGs are decoded at a reduced scale as long as both sides stay ≥ this.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (palette, CMYK, grey, 16-bit, alpha) to 8-bit RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = arr / (65535.0 if hi > 255 else 255.0) * 255.0
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def build_transform(img_size: int, train: bool, augment: str = "light", hflip: bool = True) -> v2.Compose:
    """PIL image -> uint8 tensor (3, img_size, img_size).

    Eval: square bilinear resize, no crop (as Query2Label evaluates). Train: "none" (eval resize),
    "light" (random resized crop, scale 0.7–1), "randaugment" (square resize + RandAugment + Cutout).
    """
    steps: list = [v2.PILToTensor()]
    if not train or augment == "none":
        steps.append(v2.Resize((img_size, img_size), antialias=True))
    elif augment == "light":
        steps.append(v2.RandomResizedCrop((img_size, img_size), scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True))
    elif augment == "randaugment":
        steps += [v2.Resize((img_size, img_size), antialias=True), v2.RandAugment(),
                  v2.RandomErasing(p=0.5, scale=(0.02, 0.15), value=0)]
    else:
        raise ValueError(f"unknown augment '{augment}'; choose none, light or randaugment")
    if train and hflip and augment != "none":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised, in one pass on the batch's device."""
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
    return (images.float() - mean_t) * inv_std


class ImageDataset(Dataset):
    """Rows of a LabelSet as (uint8 image (3,S,S), int8 targets (K,), index).

    A file that cannot be decoded yields ``None`` in place of the image (and a warning-free
    record of its path) when ``strict`` is off, so one bad file never kills a long run;
    :func:`collate` drops such rows and reports them.
    """

    def __init__(self, labelset: LabelSet, transform, targets: np.ndarray | None = None, strict: bool = False,
                 decode_size: int | None = None) -> None:
        self.labelset = labelset
        self.transform = transform
        self.targets = labelset.train_targets if targets is None else targets
        self.strict = strict
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.labelset)

    def __getitem__(self, i: int):
        path = self.labelset.path(i)
        target = torch.from_numpy(np.array(self.targets[i], dtype=np.int8))
        try:
            img = load_image(path, self.decode_size)
        except ImageError as e:
            if self.strict:
                raise
            return None, target, i, str(e)
        return self.transform(img), target, i, None


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Stack good rows; return (images uint8 (B,3,S,S), targets int8 (B,K), indices (B,), bad-file messages)."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[3] for b in batch if b[0] is None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([b[0] for b in good])
    targets = torch.stack([b[1] for b in good])
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, targets, indices, bad


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, sampler=None,
                drop_last: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader with mlic's collate, pinned memory on CUDA and persistent workers."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        persistent_workers=workers > 0, generator=generator,
    )
