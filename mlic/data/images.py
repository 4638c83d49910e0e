"""Image decoding, transforms and the Dataset every trainer reads.

Images stay uint8 from the file to the batch: JPEGs large enough are decoded at a reduced DCT scale
(never below the target size), the resize runs on uint8 in torch's vectorised kernel (about 3x
PIL's bilinear resize on one core), and the conversion to float and the normalisation happen once
per batch (:func:`normalize`), on whatever device the batch is on.

A file that cannot be used (missing, truncated, undecodable, a decompression bomb) is reported with
its path: :class:`ImageDataset` yields ``None`` for it and :func:`collate` drops the row and returns
the message; :class:`BadImageCheck` counts them per split and stops a run past ``--max-bad-images``
(or at the first with ``--strict-images``). :func:`read_image` is the one path from a file to a model
input that training, evaluation, feature extraction and prediction share.

Only the formats in :data:`FORMATS` are decoded (:func:`open_image`, which every decoder here, the GPU path
and the HTTP service open files with): PIL knows nearly forty more, some handed to outside programs (EPS to
Ghostscript), and none of them is a format anyone trains on; a file in one of them is an unreadable image.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms import v2

from mlic.config import AUGMENTS
from mlic.data.labelset import LabelSet
from mlic.errors import MlicError

try:  # torchvision 0.29 deprecates its decoders for TorchCodec; without them PIL decodes everything
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
except ImportError:
    decode_jpeg = None


class ImageError(MlicError):
    """An image cannot be read; the message names the file."""


class FormatError(ImageError):
    """A file that is not in one of :data:`FORMATS` (whether PIL could read it or not); the message names the file."""


FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""The image formats mlic decodes, as PIL names them; everything else is refused before any of it is parsed."""

FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF"
""":data:`FORMATS` as the messages and the docs spell them."""


def sniff_format(prefix: bytes, name: str | Path | None = None) -> str | None:
    """The PIL format of a file from the plugins' signature checks on its first bytes alone (nothing is parsed).

    Args:
        prefix: the file's first 16 bytes (or more).
        name: the file's name: its extension's format wins when that format's signature check passes or it has
            none (TGA has none, and a TGA can start like a CUR).

    Returns:
        The PIL format name, or None when no signature matches and the extension says nothing.
    """
    Image.init()
    by_extension = Image.registered_extensions().get(Path(str(name)).suffix.lower()) if name is not None else None
    if by_extension in Image.OPEN:
        accept = Image.OPEN[by_extension][1]
        if accept is None or accept(prefix[:16]):
            return by_extension
    for kind in Image.ID:
        accept = Image.OPEN[kind][1]
        if accept is not None and accept(prefix[:16]):
            return kind
    return None


def open_image(source, name: str | Path | None = None) -> Image.Image:
    """``PIL.Image.open`` limited to :data:`FORMATS`: reads the header only (a decompression bomb raises here).

    Args:
        source: a path or a binary file object (seekable).
        name: what messages call the file (default ``source``).

    Raises:
        FormatError: the file is in another format (the message names it when its signature is known) or in none.
        Exception: whatever PIL raises for a file of an allowed format with a corrupt header.
    """
    if isinstance(source, (str, Path)) and not stat.S_ISREG(os.stat(source).st_mode):
        # a FIFO or device named .jpg would block the reader forever (os.stat itself never blocks)
        raise FormatError(f"{name or source}: not a regular file (a pipe, socket or device); give image files")
    try:
        return Image.open(source, formats=FORMATS)
    except UnidentifiedImageError:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                prefix = f.read(16)
        else:
            source.seek(0)
            prefix = source.read(16)
        name = source if name is None else name
        kind = sniff_format(prefix, name if isinstance(name, (str, Path)) else None)
        if kind in FORMATS:  # an allowed format that its plugin refuses: a corrupt file
            raise
        if kind is None:
            raise FormatError(f"{name}: cannot decode image: not in a format mlic reads ({FORMAT_NAMES})") from None
        raise FormatError(f"{name}: {kind} file, not a format mlic reads ({FORMAT_NAMES}); convert it to one of "
                          "them") from None


@contextlib.contextmanager
def _reading(path: str | Path):
    """Turn whatever decoding a file raises into one ImageError naming the file."""
    # A truncated file must fail, not come back padded with grey; some libraries switch this on globally.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision's, once per call
            yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: image not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused, decompression bomb ({e})") from None
    except Exception as e:  # a corrupt file can make any PIL plugin raise anything
        reason = str(e).rsplit(", ", 1)[-1] if str(e).startswith("decode_jpeg") else str(e)  # drop C++ locations
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {reason})") from None


DRAFT_MARGIN = 2
"""Reduced-size JPEG decoding keeps both sides ≥ this many times the size asked for. DCT scaling is a box
filter; with at least 2× left for the antialiased resize, the result stays within a level or two of the
full decode (a margin near 1 was measured up to 4 levels off)."""


def _draft_scale(size: tuple[int, int], min_size: int | None) -> int:
    """The DCT scale (1, 2, 4, 8) a JPEG of ``size`` is decoded at for ``min_size``: both sides stay
    ≥ ``DRAFT_MARGIN × min_size``; 1 (full size) whenever a side is smaller than that, however small."""
    if not min_size:
        return 1
    ratio = min(size[0] // (DRAFT_MARGIN * min_size), size[1] // (DRAFT_MARGIN * min_size))
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _decode_pil(img: Image.Image, min_size: int | None) -> Image.Image:
    scale = _draft_scale(img.size, min_size) if img.format == "JPEG" else 1
    if scale > 1:  # PIL picks the largest scale keeping both sides ≥ the size given: exactly ``scale``
        img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
    img.load()  # the full decode: truncation and corrupt data surface here, inside the caller's _reading
    ImageOps.exif_transpose(img, in_place=True)
    return to_rgb(img)


def load_image(path: str | Path, min_size: int | None = None, data: bytes | None = None) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image, honouring EXIF orientation.

    Args:
        path: image file.
        min_size: if given, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) as long as both sides
            stay ≥ ``DRAFT_MARGIN`` × this, so quality at the target size is kept (any image smaller than
            that decodes at full size).
        data: the file's bytes, already read (e.g. from a shard); ``path`` then only names them in messages.

    Raises:
        ImageError: missing, truncated or undecodable file, a format not in :data:`FORMATS`, or more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb); the message starts with the path.
    """
    with _reading(path):
        return _decode_pil(open_image(path if data is None else io.BytesIO(data), path), min_size)


ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that makes the image upright (what ``ImageOps.exif_transpose`` applies)."""


def webp_size(prefix: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP file's first 30 bytes declare (None for anything else): PIL allocates a WebP's
    whole canvas when it opens the file, so a pixel limit has to be applied before that."""
    if len(prefix) < 30 or prefix[:4] != b"RIFF" or prefix[8:12] != b"WEBP":
        return None
    chunk = prefix[12:16]
    if chunk == b"VP8 " and prefix[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(prefix[26:28], "little") & 0x3FFF, int.from_bytes(prefix[28:30], "little") & 0x3FFF
    if chunk == b"VP8X":
        return int.from_bytes(prefix[24:27], "little") + 1, int.from_bytes(prefix[27:30], "little") + 1
    if chunk == b"VP8L" and prefix[20] == 0x2F:
        bits = int.from_bytes(prefix[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def load_reduced(path: str | Path, size: int, max_pixels: int, data: bytes | None = None) -> tuple[Image.Image, int]:
    """Decode an image for a square ``size`` x ``size`` resize (no crop, as the eval transform does) with as
    little memory as the format allows; what the HTTP service decodes uploads with.

    The pixel limit is applied to the header before anything is decoded (for WebP before PIL opens it). JPEGs are
    decoded at a reduced DCT scale (:func:`load_image`'s rule); any image still over ``DRAFT_MARGIN`` x ``size``
    along an axis is box-reduced right after decoding, along each axis on its own (so a 100000 x 250 strip
    shrinks too), before EXIF orientation and the RGB conversion, so those copies are small. The peak is the
    decoded image (4 bytes a pixel in PIL, whatever the mode) and what its decoder holds beside it; the docs'
    table of measurements is in ``docs/deploy.md``.

    Args:
        path: image file, or what ``data`` is called in messages.
        size: the square side the image will be resized to.
        max_pixels: most pixels (width x height) accepted.
        data: the file's bytes (default: read ``path``).

    Returns:
        An 8-bit RGB image, upright, no side over about 2 x ``DRAFT_MARGIN`` x ``size`` (or the file's own), and
        the file's pixel count (width x height of its header), for the caller's memory bookkeeping.

    Raises:
        FormatError: not in :data:`FORMATS`.
        ImageError: over ``max_pixels``, truncated, corrupt, or a decompression bomb; the message starts with
            ``path``.
    """
    with _reading(path):
        source = Path(path).open("rb") if data is None else io.BytesIO(data)
        with source:
            declared = webp_size(source.read(30))
            source.seek(0)
            if declared is not None and declared[0] * declared[1] > max_pixels:
                raise ImageError(_over_limit(path, declared, max_pixels))
            img = open_image(source, path)
            pixels = img.size[0] * img.size[1]
            if pixels > max_pixels:
                img.close()
                raise ImageError(_over_limit(path, img.size, max_pixels))
            scale = _draft_scale(img.size, size) if img.format == "JPEG" else 1
            if scale > 1:
                img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
            img.load()
        orientation = img.getexif().get(0x0112, 1)
        factors = (max(img.size[0] // (DRAFT_MARGIN * size), 1), max(img.size[1] // (DRAFT_MARGIN * size), 1))
        if factors != (1, 1):
            small = _reducible(img).reduce(factors)
            img.close()  # frees the full-size pixels (and a WebP decoder's canvas) now
            img = small
        if orientation in ORIENTATIONS:
            img = img.transpose(ORIENTATIONS[orientation])
        return to_rgb(img), pixels


def _over_limit(path, size: tuple[int, int], max_pixels: int) -> str:
    return f"{path}: {size[0]}x{size[1]} is {size[0] * size[1]} pixels, over the limit of {max_pixels}"


def _reducible(img: Image.Image) -> Image.Image:
    """``img`` in a mode ``Image.reduce`` averages correctly: palettes expanded, bilevel and 16-bit grey widened."""
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16"):
        return img.convert("I")
    return img


def decode_image(path: str | Path, min_size: int | None = None, data: bytes | None = None) -> torch.Tensor:
    """Decode an image file to uint8 RGB (3, H, W) (channels-last in memory), as :func:`load_image` would.

    Baseline/progressive RGB and grey JPEGs that need no reduced-scale decode go straight from libjpeg-turbo
    into a tensor (torchvision's decoder, EXIF orientation applied, the same pixels as PIL); everything
    else decodes through :func:`load_image`. ``data``: the file's bytes, already read (``path`` names them).

    Raises:
        ImageError: as :func:`load_image`.
    """
    with _reading(path):
        img = open_image(path if data is None else io.BytesIO(data), path)  # the header; refuses bombs
        fast = decode_jpeg is not None and img.format == "JPEG" and img.mode in ("RGB", "L")
        if fast and _draft_scale(img.size, min_size) == 1:
            img.close()
            raw = read_file(str(path)) if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        img = _decode_pil(img, min_size)
    return ToUint8Tensor()(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Palette, CMYK, YCbCr, LAB, grey and bilevel go through PIL's conversions; 16-bit and 32-bit integer
    grey are scaled from the 16-bit range (65535 -> 255, whatever the image's own maximum), float grey is
    taken as 0..255; alpha (RGBA, LA, PA, palette transparency) is composited on white.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        arr = arr.astype(np.float32) / 257.0 if img.mode != "F" else arr.astype(np.float32)
        return Image.fromarray(np.rint(arr).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


class ToUint8Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W), channels-last in memory; a tensor passes through."""

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return img
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class Cutout:
    """Query2Label's Cutout on uint8 (3, H, W): a rectangle of ``factor`` x the image's sides, centred at a
    uniform random point and clipped to the image, filled with one random colour, every call."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        ch, cw = int(self.factor * h + 0.5), int(self.factor * w + 0.5)
        y, x = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y1, y2 = max(y - ch // 2, 0), min(y + ch // 2, h)
        x1, x2 = max(x - cw // 2, 0), min(x + cw // 2, w)
        image = image.clone()
        image[:, y1:y2, x1:x2] = torch.randint(256, (3, 1, 1), dtype=torch.uint8)
        return image

    def __repr__(self) -> str:
        return f"Cutout(factor={self.factor})"


def build_transform(img_size: int, train: bool, augment: str = "light", hflip: bool = True) -> v2.Compose:
    """Image (PIL RGB, or uint8 tensor (3, H, W)) -> uint8 tensor (3, img_size, img_size).

    Eval: square bilinear resize (antialiased), no crop, as Query2Label evaluates. Train: "none" (the eval
    resize), "flip" (the eval resize; flips), "light" (random resized crop, scale 0.7–1), "randaugment"
    (square resize, Cutout 0.5, RandAugment: Query2Label's recipe); a horizontal flip unless ``hflip`` is off
    or augment is "none".

    The returned Compose carries two attributes :class:`ImageDataset` reads: ``decode_size``, the smallest
    decode size that keeps full quality, and ``tensor_input = True``.
    """
    if augment not in AUGMENTS:
        raise MlicError(f"unknown augment '{augment}'; choose one of {', '.join(AUGMENTS)}")
    size = (img_size, img_size)
    steps: list = [ToUint8Tensor()]
    decode_size = img_size
    if not train or augment in ("none", "flip"):
        steps.append(v2.Resize(size, antialias=True))
    elif augment == "light":
        scale, ratio = (0.7, 1.0), (0.85, 1.18)
        steps.append(v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True))
        # the smallest crop side is sqrt(scale * min(ratio, 1/ratio)) of the image's: decode that much larger
        decode_size = math.ceil(img_size / math.sqrt(scale[0] / ratio[1]))
    else:
        steps += [v2.Resize(size, antialias=True), Cutout(0.5), v2.RandAugment()]
    if train and hflip and augment != "none":
        steps.append(v2.RandomHorizontalFlip())
    compose = v2.Compose(steps)
    compose.decode_size = decode_size
    compose.tensor_input = True
    return compose


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) in any memory layout -> float32 (B, C, H, W) contiguous, (x / 255 - mean) / std.

    One pass converts (and un-transposes a channels-last batch) into the output, then each channel plane is
    scaled and shifted in place: contiguous, vectorised work, about twice as fast on a CPU as
    ``(x.float() - mean) / std`` with broadcasting.
    """
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    out.copy_(images)
    for c, (m, s) in enumerate(zip(mean, std)):
        out[:, c].mul_(1.0 / (255.0 * s)).add_(-m / s)
    return out


class ImageDataset(Dataset):
    """Rows of a LabelSet as (uint8 image (3, S, S), int8 targets (K,), index, error message or None).

    A file that cannot be decoded yields ``None`` in place of the image and the :class:`ImageError`
    message (starting with the path); :func:`collate` drops such rows and returns the messages, and the
    consumer of the loader decides (:class:`BadImageCheck`): skip and count, or stop. Errors are never
    raised inside a loader worker, where they would arrive wrapped in a worker traceback.

    Args:
        labelset: images and labels.
        transform: image -> uint8 tensor (3, S, S), e.g. :func:`build_transform`. It gets a PIL RGB image,
            or a uint8 tensor (3, H, W) when it has ``tensor_input = True`` (faster: no PIL round trip).
        targets: (N, K) labels to return; default ``labelset.train_targets``.
        decode_size: reduced-scale JPEG decoding down to this size; default the transform's
            ``decode_size`` (set by :func:`build_transform`), else full-size decoding.
        read: file -> image, with :func:`read_image`'s arguments; :func:`mlic.data.gpu_decode.read_encoded`
            leaves JPEGs for the training device to decode.
    """

    def __init__(self, labelset: LabelSet, transform, targets: np.ndarray | None = None,
                 decode_size: int | None = None, read=None) -> None:
        self.labelset = labelset
        self.transform = transform
        self.targets = labelset.train_targets if targets is None else targets
        self.decode_size = decode_size
        self.read = read or read_image

    def __len__(self) -> int:
        return len(self.labelset)

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = item if isinstance(item, tuple) else (item, None)
        target = torch.from_numpy(np.array(self.targets[i], dtype=np.int8))
        try:
            if seed is None:
                img = self.read(self.labelset.path(i), self.transform, self.decode_size)
            else:  # the augmentation draws of this sample depend on its seed only, not on worker or order
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it queues CUDA seeding
                    img = self.read(self.labelset.path(i), self.transform, self.decode_size)
        except ImageError as e:
            return None, target, i, str(e)
        return img, target, i, None


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one training sample's augmentation: a function of (run seed, epoch, dataset row) alone, so
    the pixels do not depend on batch, worker, rank or storage (a folder or shards), and a resumed run
    draws them again."""
    key = (seed * 1_000_003 + epoch) % 2**62
    return (key * 1_000_033 + row) % 2**62


class EpochOrder(torch.utils.data.Sampler):
    """The training order: a fresh permutation each epoch, a function of (seed, epoch) alone, so a resumed
    run replays it exactly, from any batch. Yields (row, sample seed) pairs for :class:`ImageDataset`.

    Under DDP each rank takes every ``world``-th row of the (padded) permutation, as DistributedSampler does.

    Args:
        num_rows: rows of the training set.
        seed: the run's seed.
        rank, world: this process's place under DDP (0, 1 without).
    """

    def __init__(self, num_rows: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.num_rows, self.seed, self.rank, self.world = num_rows, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw, and how many of this rank's rows of it were already used (a resumed epoch)."""
        self.epoch, self.start = epoch, start

    def rows(self) -> torch.Tensor:
        """This rank's rows of the epoch, in order (before ``start`` is skipped)."""
        key = (self.seed * 1_000_003 + self.epoch) % 2**62
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(key))
        per_rank = math.ceil(self.num_rows / self.world)
        order = torch.cat([order, order[:per_rank * self.world - self.num_rows]])  # pad, as DistributedSampler
        return order[self.rank::self.world]

    def __iter__(self):
        rows = self.rows().tolist()
        for position in range(self.start, len(rows)):
            yield rows[position], self.sample_seed(rows[position])

    def sample_seed(self, row: int) -> int:
        """The seed this epoch's order hands :class:`ImageDataset` with ``row``."""
        return sample_seed(self.seed, self.epoch, row)

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.world) - self.start


def read_image(path: str | Path, transform, decode_size: int | None = None, data: bytes | None = None) -> torch.Tensor:
    """The one path from a file to a model input, shared by training, evaluation, features and prediction.

    Decodes ``path`` (reduced-scale JPEG decoding down to ``decode_size``, default the transform's
    ``decode_size``) and applies ``transform``: a uint8 tensor (3, S, S) for :func:`build_transform`.
    ``data``: the file's bytes, already read (streamed from a shard); ``path`` then only names them.

    Raises:
        ImageError: the file cannot be used; the message starts with the path.
    """
    size = decode_size if decode_size is not None else getattr(transform, "decode_size", None)
    if getattr(transform, "tensor_input", False):
        return transform(decode_image(path, size, data))
    return transform(load_image(path, size, data))


def parse_bad_limit(text: str | float | int) -> float:
    """``--max-bad-images``: "1%" or "0.01" (a share of the split, < 1) or "25" (a count, ≥ 1)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)) or (value >= 1 and not value.is_integer()):
        raise MlicError(f"--max-bad-images {text!r}: write a share like 1% or 0.01, or a count like 25")
    return value


class BadImageCheck:
    """Counts a split's unreadable images and stops the run when they pass the limit.

    Args:
        split: the split's name, for messages ("train", "val", "test", ...).
        total: images in the split.
        limit: a share of ``total`` (< 1) or a count (≥ 1) of unreadable images tolerated
            (:func:`parse_bad_limit`); the default 0.01 is 1 %.
        strict: stop at the first unreadable image.
    """

    def __init__(self, split: str, total: int, limit: float = 0.01, strict: bool = False) -> None:
        self.split, self.total, self.limit, self.strict = split, total, limit, strict
        self.allowed = 0 if strict else int(limit) if limit >= 1 else int(limit * total)
        self.messages: list[str] = []

    def add(self, messages: list[str]) -> None:
        """Record the messages of a batch's dropped rows; raises once the limit is passed."""
        self.messages += messages
        if not messages:
            return
        if self.strict:
            raise ImageError(f"{messages[0]} (stopped by --strict-images; drop it for skipping and counting)")
        if len(self.messages) > self.allowed:
            shown = f"{self.limit:g}" if self.limit >= 1 else f"{self.limit * 100:g}%"
            raise ImageError(f"{self.split}: more than {self.allowed} of {self.total} images are unreadable "
                             f"(--max-bad-images {shown}), e.g. {self.messages[0]}; repair or remove those files, "
                             "or raise --max-bad-images")

    def finish(self, readable: int) -> None:
        """After a full pass: a split with no readable image is an error whatever the limit."""
        if readable == 0:
            example = f", e.g. {self.messages[0]}" if self.messages else ""
            raise ImageError(f"{self.split}: none of its {self.total} images could be read{example}")

    @property
    def count(self) -> int:
        return len(self.messages)


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Stack good rows; drop bad ones.

    Returns:
        images uint8 (B, 3, S, S) stored channels-last (a plain copy per image; :func:`normalize` returns
        a contiguous float batch), targets int8 (B, K), indices int64 (B,), messages of the dropped rows.
    """
    good = [b for b in batch if b[0] is not None]
    bad = [b[3] for b in batch if b[0] is None]
    if not good:
        empty = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.long)
        return (*empty, bad)
    first = good[0][0]
    shape = (len(good), *first.shape)
    if get_worker_info() is not None:  # in a worker: write straight into shared memory, saving the IPC copy
        storage = first._typed_storage()._new_shared(math.prod(shape), device=first.device)
        c, h, w = first.shape
        images = first.new(storage).as_strided(shape, (c * h * w, 1, w * c, c))
    else:
        images = torch.empty(shape, dtype=first.dtype, memory_format=torch.channels_last)
    for k, b in enumerate(good):
        images[k].copy_(b[0])
    targets = torch.stack([b[1] for b in good])
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, targets, indices, bad


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, sampler=None,
                drop_last: bool = False, seed: int = 0, prefetch_factor: int = 4, collate_fn=collate) -> DataLoader:
    """A DataLoader with mlic's collate (or ``collate_fn``), pinned memory on CUDA and persistent workers.

    Each worker decodes with one torch thread (the DataLoader's default); ``prefetch_factor`` batches
    per worker are kept in flight.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=collate_fn, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        persistent_workers=workers > 0, generator=generator, prefetch_factor=prefetch_factor if workers else None,
    )
