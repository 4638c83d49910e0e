"""JPEG decoding on the training device (``--decode-device cuda``): workers read bytes, the GPU decodes.

The split of the work: a loader worker opens each file's header only (:func:`read_encoded`, which refuses
decompression bombs as :func:`mlic.data.images.read_image` does) and hands a JPEG that the CPU path would give
libjpeg-turbo (RGB or grey, baseline or progressive) on undecoded, with its EXIF orientation; every other file
(PNG, WebP, CMYK JPEG, …) is decoded and transformed in the worker by ``read_image``, so nothing is dropped.
:func:`collate_encoded` keeps the two kinds apart, and :func:`decode_batch` decodes the JPEGs of a batch in one
``torchvision.io.decode_jpeg`` call on the device (nvjpeg on CUDA), turns them upright, runs the training
transform on the device under each sample's seed (the same draws as the CPU path, so a (seed, epoch, row)
gets the same flip, crop box and RandAugment ops), and stacks everything into one uint8 batch.

The geometry is the CPU path's: where that path decodes a large JPEG at a reduced DCT scale
(:data:`mlic.data.images.DRAFT_MARGIN`), the device decodes it in full and box-averages it down by the same
factor to the same size (within 2 levels of libjpeg's scaled decode), so the random crop boxes, drawn from the
image size, are the same boxes. What remains is rounding: CUDA resizes in float where the CPU resizes uint8. A
JPEG the device decoder refuses is decoded on the CPU; one the CPU cannot decode either is reported with its
name, exactly as ``read_image`` reports it, and counted by the caller's
:class:`mlic.data.images.BadImageCheck`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mlic.data.images import ImageError, _draft_scale, _reading, decode_image, open_image, read_image
from mlic.errors import MlicError

try:  # as in mlic.data.images: torchvision may one day drop its decoders
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

EXIF_ORIENTATION = 0x0112


@dataclass
class EncodedJpeg:
    """A JPEG file's bytes, not decoded yet.

    Attributes:
        data: the file's bytes, uint8 (L,) on the CPU.
        name: the file (or ``shard:path``), for messages.
        orientation: its EXIF orientation, 1 (upright) to 8.
    """

    data: torch.Tensor
    name: str
    orientation: int = 1


def check_decode_device(decode_device: str, device: torch.device | str | None = None) -> None:
    """Refuse ``--decode-device cuda`` unless the run trains on a CUDA device (``device``; default the one a plain
    run gets: CUDA when available), in one line."""
    if decode_device == "cpu":
        return
    device = device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if decode_jpeg is None:
        raise MlicError(f"--decode-device {decode_device}: this torchvision has no JPEG decoder; drop the option")
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise MlicError(f"--decode-device {decode_device}: CUDA is not available here (the run trains on "
                        f"{torch.device(device).type}); drop the option to decode on the CPU workers")


def read_encoded(path: str | Path, transform, decode_size: int | None = None,
                 data: bytes | None = None) -> torch.Tensor | EncodedJpeg:
    """:func:`mlic.data.images.read_image`'s stand-in for :class:`~mlic.data.images.ImageDataset` and
    :class:`~mlic.data.shards.ShardDataset` (their ``read`` argument) when the device decodes.

    Returns:
        An :class:`EncodedJpeg` for an RGB or grey JPEG; for any other file, ``read_image``'s uint8 (3, S, S).

    Raises:
        ImageError: the file is missing, not an image in one of :data:`mlic.data.images.FORMATS`, or a decompression
            bomb (the message starts with the path); for a file handed on, a corrupt body is found by
            :func:`decode_batch`.
    """
    with _reading(path):  # opened as read_image opens it, so that a bad file gets the very same message
        with open_image(path if data is None else io.BytesIO(data), path) as img:  # the header; refuses bombs
            jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")
            orientation = img.getexif().get(EXIF_ORIENTATION, 1) if jpeg else 1
        raw = Path(path).read_bytes() if data is None else data
    if not jpeg or decode_jpeg is None:
        return read_image(path, transform, decode_size, data=raw)
    orientation = orientation if orientation in range(1, 9) else 1  # PIL ignores other values too
    return EncodedJpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), str(path), int(orientation))


def collate_encoded(batch: list) -> tuple[list, torch.Tensor, torch.Tensor, list[str]]:
    """:func:`mlic.data.images.collate` for rows of :func:`read_encoded`: the images stay a list.

    Returns:
        images (B items: :class:`EncodedJpeg` or uint8 (3, S, S)), targets int8 (B, K), indices int64 (B,),
        messages of the dropped rows.
    """
    good = [b for b in batch if b[0] is not None]
    bad = [b[3] for b in batch if b[0] is None]
    targets = torch.stack([b[1] for b in good]) if good else torch.empty(0, dtype=torch.int8)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return [b[0] for b in good], targets, indices, bad


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright, for EXIF orientation 1-8 (what ``PIL.ImageOps.exif_transpose`` does)."""
    if orientation in (5, 6, 7, 8):  # stored with width and height swapped
        image = image.transpose(-1, -2)
    if orientation in (2, 3, 6, 7):
        image = image.flip(-1)
    if orientation in (3, 4, 7, 8):
        image = image.flip(-2)
    return image


def reduce_like_draft(image: torch.Tensor, min_size: int | None) -> torch.Tensor:
    """A full-size decode (C, H, W), as stored, at the size the CPU path's reduced-scale JPEG decode gives it:
    box averages over the DCT scale's blocks (ceil(W / scale) x ceil(H / scale)); unchanged at scale 1."""
    scale = _draft_scale((image.shape[-1], image.shape[-2]), min_size)
    if scale == 1:
        return image
    pooled = F.avg_pool2d(image[None].float(), scale, ceil_mode=True)[0]  # edge blocks average what they hold
    return pooled.round_().to(torch.uint8)


def _device_image(image: torch.Tensor, item: EncodedJpeg, min_size: int | None) -> torch.Tensor:
    return orient(reduce_like_draft(image, min_size), item.orientation)


def _decode_one(item: EncodedJpeg, device: torch.device, min_size: int | None) -> torch.Tensor:
    """One JPEG on ``device``, else on the CPU (the CPU path's decoder) and moved; ImageError when neither can."""
    try:
        return _device_image(decode_jpeg(item.data, mode=ImageReadMode.RGB, device=device), item, min_size)
    except RuntimeError:
        return decode_image(item.name, min_size, data=item.data.numpy().tobytes()).to(device)  # upright already


def decode_batch(items: list, indices: torch.Tensor, transform, device: torch.device | str,
                 seeds: list[int] | None = None, decode_size: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a batch's JPEGs on ``device`` and transform them there: the batch the CPU path would give.

    Args:
        items: :func:`collate_encoded`'s images: :class:`EncodedJpeg` (decoded here) or uint8 (3, S, S) tensors
            (decoded and transformed by the worker; moved only).
        indices: (B,) dataset rows of ``items``.
        transform: the training transform (:func:`mlic.data.images.build_transform`), run on the device.
        device: where to decode ("cuda", or "cpu" with torchvision's CPU decoder).
        seeds: each item's sample seed (:func:`mlic.data.images.sample_seed`), as the loader's sampler gave
            them; None runs the transform on the global generator (evaluation transforms draw nothing).
        decode_size: as for :func:`mlic.data.images.read_image` (default the transform's ``decode_size``).

    Returns:
        images uint8 (B', 3, S, S) on ``device``, their rows (B',), and the messages of the B - B' JPEGs that
        no decoder could read (each starts with the file's name).
    """
    device = torch.device(device)
    size = decode_size if decode_size is not None else getattr(transform, "decode_size", None)
    pending = [k for k, item in enumerate(items) if isinstance(item, EncodedJpeg)]
    decoded: dict[int, torch.Tensor] = {}
    messages: list[str] = []
    if pending:
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision's, every call
        try:  # one call for the batch: nvjpeg's batched decode
            images = decode_jpeg([items[k].data for k in pending], mode=ImageReadMode.RGB, device=device)
            decoded = {k: _device_image(image, items[k], size) for k, image in zip(pending, images)}
        except RuntimeError:  # a file the batched call refused: one by one, so only that file is lost
            for k in pending:
                try:
                    decoded[k] = _decode_one(items[k], device, size)
                except ImageError as e:
                    messages.append(str(e))
    out, kept = [], []
    for k, item in enumerate(items):
        if k in decoded:
            image = decoded[k]
            if seeds is None:
                image = transform(image)
            else:  # the draws the CPU path makes for this sample: the same seed on the same (CPU) generator
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seeds[k])
                    image = transform(image)
        elif isinstance(item, torch.Tensor):
            image = item.to(device, non_blocking=True)
        else:
            continue
        out.append(image)
        kept.append(k)
    if not out:
        return torch.empty(0, dtype=torch.uint8, device=device), indices[:0], messages
    return torch.stack(out), indices[kept], messages
