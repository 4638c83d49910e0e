"""Images shaped like the users': real sizes, formats and EXIF orientations, at every target size.

Every file goes through :func:`read_image`, the one path training, evaluation, feature extraction
and prediction share, with and without augmentation, and is checked against a plain PIL decode:
exactly equal pixels at the scale our decoder chose; where the reduced-size (DCT-scaled) decode
was used, against the full-size decode too: within one level but for a rare pixel (under 0.5 %) two
levels off. DCT scaling is a box filter, the antialiased resize a triangle one; with the 2x margin the
decoder keeps (``DRAFT_MARGIN``) that is what was measured on this grid, the price of the speed-up.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mlic.data.images import _draft_scale, build_transform, read_image

SIZES = [(1, 1), (80, 100), (333, 500), (500, 375), (640, 427), (640, 480), (480, 640), (1024, 768), (4000, 3000)]
"""(width, height) as stored in the file."""
FORMATS = ["jpeg", "progressive", "grey", "cmyk", "png", "webp"]
TARGETS = [64, 224, 448, 576, 640]
MODES = [(False, "none"), (True, "light")]  # evaluation / prediction, and training with augmentation


def smooth_photo(w: int, h: int, seed: int) -> np.ndarray:
    """Slowly varying colour fields, like sky and walls: what a photo mostly is, and what JPEG keeps."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = x / max(w, 1), y / max(h, 1)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [128 + 90 * np.sin(2 * np.pi * (0.6 * u + 0.4 * v) + phase[0]),
                128 + 90 * np.cos(2 * np.pi * (0.3 * u - 0.7 * v) + phase[1]),
                64 + 160 * u * v + 10 * np.sin(phase[2])]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def write(path, fmt: str, w: int, h: int, orientation: int, seed: int) -> None:
    rgb = Image.fromarray(smooth_photo(w, h, seed))
    exif = Image.Exif()
    exif[0x0112] = orientation
    if fmt == "jpeg":
        rgb.save(path, "JPEG", quality=90, exif=exif)
    elif fmt == "progressive":
        rgb.save(path, "JPEG", quality=90, progressive=True, exif=exif)
    elif fmt == "grey":
        rgb.convert("L").save(path, "JPEG", quality=90, exif=exif)
    elif fmt == "cmyk":
        rgb.convert("CMYK").save(path, "JPEG", quality=90, exif=exif)
    elif fmt == "png":
        rgb.save(path, "PNG", compress_level=1, exif=exif)
    else:
        rgb.save(path, "WEBP", quality=90, method=0, exif=exif)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[tuple[str, object]]:
    """One file per (size, format); EXIF orientations 1–8 cycle through the grid so each appears often."""
    folder = tmp_path_factory.mktemp("real")
    out = []
    for k, ((w, h), fmt) in enumerate(itertools.product(SIZES, FORMATS)):
        orientation = k % 8 + 1
        suffix = "jpg" if fmt in ("jpeg", "progressive", "grey", "cmyk") else fmt
        path = folder / f"{w}x{h}_{fmt}_o{orientation}.{suffix}"
        write(path, fmt, w, h, orientation, k)
        out.append((path.name, path))
    return out


def pil_decode(path, scale: int = 1) -> Image.Image:
    """The plain PIL way: open, JPEG draft at 1/``scale`` when > 1, EXIF transpose, RGB."""
    img = Image.open(path)
    if scale > 1:
        img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
    img.load()
    return ImageOps.exif_transpose(img).convert("RGB")


def test_grid_covers_the_cases(files):
    assert len(files) == len(SIZES) * len(FORMATS)
    assert {Image.open(p).mode for _, p in files} >= {"RGB", "L", "CMYK"}
    assert {Image.open(p).getexif().get(0x0112) for _, p in files} == set(range(1, 9))
    assert any(Image.open(p).info.get("progressive") for _, p in files)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("train, augment", MODES)
def test_every_valid_image_decodes_at_every_size(files, target, train, augment):
    transform = build_transform(target, train=train, augment=augment)
    reduced_seen = 0
    for k, (name, path) in enumerate(files):
        with Image.open(path) as probe:
            scale = _draft_scale(probe.size, transform.decode_size) if probe.format == "JPEG" else 1
        torch.manual_seed(k)
        ours = read_image(path, transform)  # raises on any failure: a valid image must never be dropped
        assert ours.shape == (3, target, target) and ours.dtype == torch.uint8, name
        # the same pixels as PIL decoding at the scale our decoder chose, through the same (seeded) transform
        torch.manual_seed(k)
        reference = transform(pil_decode(path, scale))
        diff = (ours.int() - reference.int()).abs().max().item()
        assert diff == 0, f"{name} at {target} ({'train' if train else 'eval'}): differs from PIL by {diff}"
        if scale > 1 and not train:  # reduced-size decoding only speeds up: next to no change from the full decode
            reduced_seen += 1
            diff = (ours.int() - transform(pil_decode(path)).int()).abs()
            assert diff.max() <= 2 and (diff > 1).float().mean() < 5e-3, f"{name} at {target}: {diff.max()} levels"
            assert diff.float().mean() < 0.3, f"{name} at {target}"
    if not train and target <= 224:
        assert reduced_seen > 0  # the grid does exercise reduced-size decoding


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_at_448(tmp_path, orientation):
    path = tmp_path / "o.jpg"
    write(path, "jpeg", 640, 427, orientation, seed=3)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    for train, augment in MODES:
        transform = build_transform(448, train=train, augment=augment)
        torch.manual_seed(0)
        ours = read_image(path, transform)
        torch.manual_seed(0)
        assert torch.equal(ours, transform(upright)), (orientation, train)
