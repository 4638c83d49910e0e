"""Image decoding, mode conversion, EXIF, bad files, transforms and batching, on real files written by PIL."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mlic.data.images import (
    BadImageCheck,
    Cutout,
    FormatError,
    ImageDataset,
    ImageError,
    build_transform,
    collate,
    decode_image,
    load_image,
    load_reduced,
    make_loader,
    normalize,
    parse_bad_limit,
    read_image,
)
from mlic.data.labelset import LabelSet

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients: JPEG keeps them close to the original."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, rng.integers(0, 255))], -1)
    return img.astype(np.uint8)


def both(path: Path) -> np.ndarray:
    """Decode with both public decoders, check they agree, return HWC uint8."""
    pil = np.asarray(load_image(path))
    tensor = decode_image(path).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pil, tensor)
    return pil


# ---- mode conversions ---------------------------------------------------------------------------------------

def test_palette_png(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    img.save(tmp_path / "p.png")
    out = both(tmp_path / "p.png")
    assert out.shape == (2, 4, 3)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 255]


def test_palette_with_transparency_goes_on_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 0, 0, 0] + [0] * 762)
    img.putdata([0, 1])
    img.save(tmp_path / "t.png", transparency=1)
    out = both(tmp_path / "t.png")
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = [200, 0, 0, 255]
    rgba[0, 1] = [200, 0, 0, 0]
    rgba[0, 2] = [0, 0, 0, 128]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = both(tmp_path / "a.png")
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 2])  # half black over white
    Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert both(tmp_path / "la.png")[0].tolist() == [[50, 50, 50], [255, 255, 255]]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = both(tmp_path / "c.jpg")
    assert np.abs(out.astype(int) - [0, 255, 255]).max() <= 3  # pure cyan


def test_grey_jpeg_and_bilevel_png(tmp_path):
    Image.new("L", (16, 8), 77).save(tmp_path / "g.jpg", quality=95)
    out = both(tmp_path / "g.jpg")
    assert out.shape == (8, 16, 3) and np.abs(out.astype(int) - 77).max() <= 1
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "b.png")
    assert both(tmp_path / "b.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_16_bit_png_scaled_from_full_range(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535, 2570]], np.uint16)).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    out = both(tmp_path / "d.png")
    assert out[0, :, 0].tolist() == [0, 128, 255, 10]  # a dark 16-bit image stays dark


def test_rgb_jpeg_fast_path_matches_pil(tmp_path):
    Image.fromarray(photo(120, 160)).save(tmp_path / "r.jpg", quality=90)
    out = both(tmp_path / "r.jpg")
    assert np.abs(out.astype(int) - photo(120, 160)).mean() < 2


# ---- EXIF orientation ---------------------------------------------------------------------------------------

# what a viewer shows for each EXIF orientation, as a PIL transpose of the stored pixels
DISPLAY = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:16, :24] = [250, 0, 0]  # red top-left quarter
    stored[16:, 24:] = [0, 0, 250]  # blue bottom-right quarter
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.jpg", quality=95, exif=exif)
    out = both(tmp_path / "o.jpg")
    expected = Image.fromarray(stored)
    if orientation in DISPLAY:
        expected = expected.transpose(DISPLAY[orientation])
    expected = np.asarray(expected)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).mean() < 4


# ---- reduced-size decoding ----------------------------------------------------------------------------------

def test_draft_never_below_target(tmp_path):
    Image.fromarray(photo(1000, 2000)).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(photo(500, 1000)).save(tmp_path / "mid.jpg", quality=90)
    assert load_image(tmp_path / "big.jpg", 224).size == (1000, 500)  # 1/2 scale: both sides >= 2 x 224
    assert load_image(tmp_path / "big.jpg", 448).size == (2000, 1000)  # 1/2 would leave 500 < 2 x 448
    assert load_image(tmp_path / "big.jpg", 50).size == (250, 125)  # 1/8
    assert load_image(tmp_path / "mid.jpg", 224).size == (1000, 500)  # 1/2 would give 250 < 448
    assert tuple(decode_image(tmp_path / "big.jpg", 224).shape) == (3, 500, 1000)
    assert tuple(decode_image(tmp_path / "big.jpg", 5000).shape) == (3, 1000, 2000)  # larger than the image
    # quality at the target size: reduced decode + resize vs full decode + resize
    transform = build_transform(224, train=False)
    reduced = transform(decode_image(tmp_path / "big.jpg", 224)).float()
    full = transform(decode_image(tmp_path / "big.jpg")).float()
    assert (reduced - full).abs().mean() < 1.5


# ---- bad files ----------------------------------------------------------------------------------------------

def tiny_png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size in 100 bytes: what a decompression bomb looks like at open time."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    Image.fromarray(photo(96, 128)).save(tmp_path / "good.jpg", quality=90)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(photo(96, 128)).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    (tmp_path / "bomb.png").write_bytes(tiny_png_header(40000, 40000))
    return {name: tmp_path / f"{name}" for name in
            ("good.jpg", "truncated.jpg", "truncated.png", "garbage.jpg", "bomb.png", "missing.jpg")}


@pytest.mark.parametrize("name, reason", [
    ("truncated.jpg", "truncated"), ("truncated.png", "truncated"), ("garbage.jpg", "cannot decode"),
    ("bomb.png", "decompression bomb"), ("missing.jpg", "not found"),
])
def test_bad_file_errors_name_the_file(bad_files, monkeypatch, name, reason):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some library may have left it
    for decode in (load_image, decode_image):
        with pytest.raises(ImageError) as err:
            decode(bad_files[name])
        message = str(err.value)
        assert message.startswith(str(bad_files[name]))
        assert reason in message.lower()
        assert "\n" not in message and ".cpp" not in message


def test_moderate_bomb_refused(tmp_path, monkeypatch):
    Image.fromarray(photo(40, 40)).save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over the limit, under twice it
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(tmp_path / "x.png")


def test_bad_files_skipped_counted_or_strict(bad_files):
    names = list(bad_files)
    labelset = LabelSet(["a", "b"], names, np.tile([[1, 0]], (len(names), 1)), root=str(bad_files["good.jpg"].parent))
    dataset = ImageDataset(labelset, build_transform(32, train=False))
    images, targets, indices, bad = collate([dataset[i] for i in range(len(dataset))])
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.tolist() == [[1, 0]] and targets.dtype == torch.int8
    assert indices.tolist() == [names.index("good.jpg")]
    assert len(bad) == len(names) - 1
    assert all(any(m.startswith(str(bad_files[n])) for m in bad) for n in names if n != "good.jpg")


def test_bad_image_check_share_count_strict_and_empty():
    check = BadImageCheck("train", 1000, 0.01)  # 1 %: 10 tolerated
    check.add(["a.jpg: truncated"] * 10)
    assert check.count == 10
    with pytest.raises(ImageError, match=r"^train: more than 10 of 1000 images are unreadable \(--max-bad-images 1%\)"):
        check.add(["b.jpg: truncated"])
    counted = BadImageCheck("val", 1000, 3)
    counted.add(["x"] * 3)
    with pytest.raises(ImageError, match="more than 3 of 1000"):
        counted.add(["y"])
    with pytest.raises(ImageError, match=r"^c.jpg: cannot decode .*--strict-images"):
        BadImageCheck("test", 1000, 0.5, strict=True).add(["c.jpg: cannot decode image"])
    empty = BadImageCheck("test", 2, 5)
    empty.add(["d.jpg: image not found", "e.jpg: image not found"])
    with pytest.raises(ImageError, match="test: none of its 2 images could be read, e.g. d.jpg"):
        empty.finish(0)
    BadImageCheck("test", 0).finish(1)  # something was read: fine


@pytest.mark.parametrize("text, value", [("1%", 0.01), ("0.01", 0.01), ("25", 25.0), ("0", 0.0), ("2.5%", 0.025)])
def test_parse_bad_limit(text, value):
    assert parse_bad_limit(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-1", "2.5", "lots", "nan", "%"])
def test_parse_bad_limit_refuses(text):
    with pytest.raises(ValueError, match="--max-bad-images"):
        parse_bad_limit(text)


def test_strict_with_workers_is_one_line(bad_files):
    names = ["good.jpg", "truncated.jpg", "good.jpg", "good.jpg"]
    labelset = LabelSet(["a"], names, np.ones((4, 1), np.int8), root=str(bad_files["good.jpg"].parent))
    loader = make_loader(ImageDataset(labelset, build_transform(32, train=False)), batch_size=2, workers=2)
    check = BadImageCheck("train", 4, strict=True)
    with pytest.raises(ImageError) as err:
        for *_, messages in loader:
            check.add(messages)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert str(err.value).startswith(str(bad_files["truncated.jpg"]))


def test_collate_all_bad():
    images, targets, indices, bad = collate([(None, torch.zeros(2, dtype=torch.int8), 0, "x: image not found")])
    assert images.numel() == 0 and targets.numel() == 0 and indices.numel() == 0 and bad == ["x: image not found"]


def test_loader_with_workers_counts_bad_files(bad_files):
    names = list(bad_files) * 3
    labelset = LabelSet(["a"], names, np.ones((len(names), 1), np.int8), root=str(bad_files["good.jpg"].parent))
    loader = make_loader(ImageDataset(labelset, build_transform(32, train=True)), batch_size=4, workers=2)
    seen, bad = [], 0
    for images, targets, indices, messages in loader:
        assert len(images) == len(targets) == len(indices)
        assert len(images) == 0 or images.shape[1:] == (3, 32, 32)
        seen += indices.tolist()
        bad += len(messages)
    assert bad == 5 * 3 and sorted(seen) == [i for i, n in enumerate(names) if n == "good.jpg"]


# ---- transforms and normalisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("train, augment", [(False, "light"), (True, "none"), (True, "light"), (True, "randaugment")])
def test_transforms_keep_uint8_and_size(train, augment):
    transform = build_transform(40, train=train, augment=augment)
    out = transform(Image.fromarray(photo(50, 70)))
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    assert transform.decode_size >= 40 and transform.tensor_input


def test_eval_resize_matches_pil_bilinear():
    img = Image.fromarray(photo(480, 640))
    ours = build_transform(448, train=False)(img).permute(1, 2, 0).numpy().astype(int)
    pil = np.asarray(img.resize((448, 448), Image.BILINEAR)).astype(int)
    assert np.abs(ours - pil).max() <= 1


def test_unknown_augment():
    with pytest.raises(ValueError, match="randaugment"):
        build_transform(32, train=True, augment="heavy")


def test_cutout_paints_one_box():
    torch.manual_seed(0)
    image = torch.full((3, 20, 20), 7, dtype=torch.uint8)
    out = Cutout(0.5)(image)
    changed = (out != image).any(0)
    assert image.eq(7).all()  # input untouched
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert 0 < len(rows) <= 10 and 0 < len(cols) <= 10
    assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one filled rectangle


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_normalize(layout):
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8).contiguous(memory_format=layout)
    out = normalize(images, MEAN, STD)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---- the format allow-list --------------------------------------------------------------------------------

ALLOWED = "(JPEG, PNG, WebP, BMP, GIF, TIFF)"


@pytest.fixture
def foreign_files(tmp_path) -> dict[str, Path]:
    """Files PIL can read but mlic must not: EPS (PIL hands those to Ghostscript), PCX, TGA (no signature), PPM; a
    hand-made EPS header; and bytes in no format at all."""
    img = Image.fromarray(photo(24, 32))
    for ext in ("eps", "pcx", "tga", "ppm"):
        img.save(tmp_path / f"x.{ext}")
    (tmp_path / "header.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\n%%EndComments\n")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 4)
    return {p.name: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize("name, kind", [("x.eps", "EPS"), ("header.eps", "EPS"), ("x.pcx", "PCX"), ("x.tga", "TGA"),
                                        ("x.ppm", "PPM")])
def test_other_formats_are_unreadable_images_naming_the_format(foreign_files, monkeypatch, name, kind):
    from PIL import EpsImagePlugin

    from mlic.data.gpu_decode import read_encoded

    def never(self):
        raise AssertionError("the EPS plugin parsed the file")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    path = foreign_files[name]
    expected = f"{path}: {kind} file, not a format mlic reads {ALLOWED}; convert it to one of them"
    transform = build_transform(16, train=False)
    for decode in (load_image, decode_image, lambda p: read_image(p, transform), lambda p: read_encoded(p, transform),
                   lambda p: read_image(p, transform, data=p.read_bytes()), lambda p: load_reduced(p, 16, 10**6)):
        with pytest.raises(FormatError) as err:
            decode(path)
        assert str(err.value) == expected


def test_bytes_in_no_format_and_corrupt_allowed_ones(foreign_files, bad_files):
    with pytest.raises(FormatError, match=r"noise.bin: cannot decode image: not in a format mlic reads \(JPEG, PNG"):
        load_image(foreign_files["noise.bin"])
    with pytest.raises(ImageError, match="cannot decode") as err:  # a JPEG signature: a corrupt JPEG, not a format
        decode_image(bad_files["garbage.jpg"])
    assert not isinstance(err.value, FormatError)


def test_foreign_files_in_a_dataset_are_counted_as_unreadable(foreign_files):
    names = sorted(foreign_files)
    labelset = LabelSet(["a"], names, np.ones((len(names), 1)), root=str(foreign_files["x.eps"].parent))
    _, _, _, bad = collate([ImageDataset(labelset, build_transform(16, train=False))[i] for i in range(len(names))])
    assert len(bad) == len(names) and all("not a format mlic reads" in m or "not in a format mlic reads" in m
                                          for m in bad)


# ---- decoding uploads with bounded memory ---------------------------------------------------------------------

def test_load_reduced_matches_the_full_decode_at_the_target_size(tmp_path):
    transform = build_transform(32, train=False)
    big = photo(600, 900)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    for name in ("big.png", "big.jpg"):
        image, pixels = load_reduced(tmp_path / name, 32, 10**6)
        assert pixels == 600 * 900
        assert max(image.size) <= 2 * 2 * 32 * 2 and image.mode == "RGB"  # reduced, not 900 x 600
        reduced = transform(image).float()
        full = transform(load_image(tmp_path / name)).float()
        assert (reduced - full).abs().mean() < 1.5
    small, _ = load_reduced(tmp_path / "big.png", 400, 10**6)  # target too large to reduce: the full image
    assert small.size == (900, 600)


def test_load_reduced_reduces_each_axis_and_keeps_modes_and_orientation(tmp_path):
    strip = np.zeros((40, 4000), np.uint8)
    strip[:, 2000:] = 255
    Image.fromarray(strip).save(tmp_path / "strip.png")
    image, _ = load_reduced(tmp_path / "strip.png", 16, 10**6)
    assert image.size[0] < 200 and image.size[1] == 40  # the long side shrinks on its own
    assert np.asarray(image)[0, 0].tolist() == [0, 0, 0] and np.asarray(image)[0, -1].tolist() == [255, 255, 255]
    # palette with transparency composited on white, as load_image does, after the reduction
    palette = Image.new("P", (400, 400), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_reduced(tmp_path / "p.png", 16, 10**6)[0])[5, 5].tolist() == [255, 255, 255]
    Image.fromarray(np.full((300, 300), 65535, np.uint16)).save(tmp_path / "i16.png")
    assert np.asarray(load_reduced(tmp_path / "i16.png", 16, 10**6)[0])[3, 3].tolist() == [255, 255, 255]
    # EXIF orientation 6: stored landscape, shown portrait
    stored = np.zeros((300, 600, 3), np.uint8)
    stored[:, :300] = [250, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "o.jpg", quality=95, exif=exif)
    upright = np.asarray(load_image(tmp_path / "o.jpg", 16))
    reduced = np.asarray(load_reduced(tmp_path / "o.jpg", 16, 10**6)[0])  # squashed: the resize is square anyway
    for shown in (upright, reduced):  # the stored left half, red, is the top half once upright
        assert shown[1, shown.shape[1] // 2, 0] > 200 and shown[-2, shown.shape[1] // 2, 0] < 50


def test_load_reduced_applies_the_pixel_limit_to_the_header(tmp_path):
    Image.fromarray(photo(100, 120)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match=r"a.png: 120x100 is 12000 pixels, over the limit of 11999"):
        load_reduced(tmp_path / "a.png", 16, 11999)
    assert load_reduced(tmp_path / "a.png", 16, 12000)[1] == 12000
    # a WebP canvas is allocated when PIL opens the file: its size is read from the bytes first
    for options in ({"lossless": True}, {"quality": 50}, {"lossless": True, "exif": b"Exif\0\0"}):
        Image.new("RGBA", (3000, 2000)).save(tmp_path / "w.webp", **options)
        with pytest.raises(ImageError, match=r"w.webp: 3000x2000 is 6000000 pixels, over the limit of 100000"):
            load_reduced(tmp_path / "w.webp", 16, 100_000)
