"""The device decode path (``--decode-device``), run here with torchvision's CPU JPEG decoder (device="cpu").

The reference is always the CPU path: :class:`ImageDataset` rows with the same (row, sample seed). Where the CPU
path decodes at full size the device path gives the very same pixels, augmentation included; where it decodes a
large JPEG at a reduced DCT scale, the device path box-averages a full decode to the same size, so crop boxes
and flips are the same and pixels stay within 1 level of it (measured on this grid: max 1, mean ≤ 0.14; the
test allows 2). RandAugment's thresholds (solarize, posterize, equalize) turn a 1-level difference into a large
one at a few pixels, so there the mean is checked (measured ≤ 0.25 levels).
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mlic.config import TrainConfig
from mlic.data.gpu_decode import (
    EncodedJpeg,
    check_decode_device,
    collate_encoded,
    decode_batch,
    orient,
    read_encoded,
)
from mlic.data.images import ImageDataset, _draft_scale, build_transform, collate, make_loader, sample_seed
from mlic.data.labelset import LabelSet
from mlic.errors import MlicError

SIZES = [(80, 100), (640, 427), (480, 640), (1024, 768), (2600, 2400)]
FORMATS = ["jpeg", "progressive", "grey", "cmyk", "png"]
MODES = [(False, "none"), (True, "light"), (True, "randaugment")]


def smooth_photo(w: int, h: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = x / w, y / h
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    channels = [128 + 90 * np.sin(2 * np.pi * (0.6 * u + 0.4 * v) + phase[0]),
                128 + 90 * np.cos(2 * np.pi * (0.3 * u - 0.7 * v) + phase[1]), 64 + 160 * u * v]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def encode(fmt: str, w: int, h: int, orientation: int = 1, seed: int = 0) -> bytes:
    rgb = Image.fromarray(smooth_photo(w, h, seed))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    if fmt == "png":
        rgb.save(out, "PNG", compress_level=1)
    else:
        image = {"grey": rgb.convert("L"), "cmyk": rgb.convert("CMYK")}.get(fmt, rgb)
        image.save(out, "JPEG", quality=90, progressive=fmt == "progressive", exif=exif)
    return out.getvalue()


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> LabelSet:
    """One file per (size, format); EXIF orientations 1-8 cycle through the JPEGs."""
    folder = tmp_path_factory.mktemp("grid")
    names = []
    for k, ((w, h), fmt) in enumerate(itertools.product(SIZES, FORMATS)):
        name = f"{w}x{h}_{fmt}_o{k % 8 + 1}.{'png' if fmt == 'png' else 'jpg'}"
        (folder / name).write_bytes(encode(fmt, w, h, k % 8 + 1, seed=k))
        names.append(name)
    return LabelSet(["a"], names, np.zeros((len(names), 1), np.int8), root=folder)


def both_paths(labelset: LabelSet, transform, rows, seeds):
    """(CPU path batch, device path batch on the CPU, the device path's items) for dataset rows with seeds."""
    cpu_rows = [ImageDataset(labelset, transform)[(r, s)] for r, s in zip(rows, seeds)]
    device_rows = [ImageDataset(labelset, transform, read=read_encoded)[(r, s)] for r, s in zip(rows, seeds)]
    items, _, indices, bad = collate_encoded(device_rows)
    assert bad == []
    images, kept, messages = decode_batch(items, indices, transform, "cpu", seeds)
    assert messages == [] and kept.tolist() == list(rows)
    return torch.stack([r[0] for r in cpu_rows]), images, items


@pytest.mark.parametrize("target", [64, 448])
@pytest.mark.parametrize("train, augment", MODES)
def test_the_device_path_gives_the_cpu_paths_batch(grid, target, train, augment):
    transform = build_transform(target, train=train, augment=augment, hflip=True)
    rows = list(range(len(grid)))
    seeds = [sample_seed(7, 2, r) for r in rows]
    cpu, device, items = both_paths(grid, transform, rows, seeds)
    assert device.shape == cpu.shape == (len(rows), 3, target, target) and device.dtype == torch.uint8
    reduced = 0
    for k, item in enumerate(items):
        name = grid.image_paths[k]
        jpeg = name.endswith(".jpg") and "cmyk" not in name
        assert isinstance(item, EncodedJpeg) == jpeg, name  # CMYK and PNG decode in the worker, as before
        diff = (device[k].int() - cpu[k].int()).abs()
        with Image.open(grid.path(k)) as probe:
            scale = _draft_scale(probe.size, transform.decode_size) if jpeg else 1
        if scale == 1:
            assert diff.max() == 0, f"{name} at {target} {augment}: differs by {diff.max()}"
            continue
        reduced += 1
        if augment == "randaugment":
            assert diff.float().mean() < 0.5, f"{name} at {target}: mean {diff.float().mean():.3f}"
        else:
            assert diff.max() <= 2 and diff.float().mean() < 0.2, f"{name} at {target}: {diff.max()} levels"
    assert reduced > 0  # the grid does reach the box-averaged (reduced-scale) case at every size


def test_a_sample_seed_gives_the_same_draws_and_another_seed_others(grid):
    transform = build_transform(64, train=True, augment="light", hflip=True)
    row = next(k for k, p in enumerate(grid.image_paths) if p.startswith("640x427_jpeg"))
    images = [both_paths(grid, transform, [row], [seed])[1][0] for seed in (1, 1, 2, 3)]
    assert torch.equal(images[0], images[1])
    assert not torch.equal(images[0], images[2]) or not torch.equal(images[0], images[3])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_pil_exif_transpose(orientation):
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    upright = np.array(ImageOps.exif_transpose(stored))
    ours = orient(torch.from_numpy(np.array(stored)).permute(2, 0, 1), orientation)
    assert torch.equal(ours.permute(1, 2, 0), torch.from_numpy(upright))


def test_bad_files_give_the_cpu_paths_messages_and_the_rest_of_the_batch_survives(tmp_path):
    good = encode("jpeg", 120, 90)
    files = {"good.jpg": good, "truncated.jpg": good[: len(good) // 2], "garbage.jpg": b"\xff\xd8" + bytes(200),
             "not_an_image.jpg": b"hello", "truncated.png": encode("png", 64, 48)[:300], "good2.jpg": good}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = [*files, "missing.jpg"]
    labelset = LabelSet(["a"], names, np.zeros((len(names), 1), np.int8), root=tmp_path)
    transform = build_transform(32, train=True, augment="light")
    rows = list(range(len(names)))
    seeds = [sample_seed(0, 0, r) for r in rows]
    cpu_images, _, cpu_rows, cpu_bad = collate([ImageDataset(labelset, transform)[(r, s)] for r, s in zip(rows, seeds)])
    items, _, indices, bad = collate_encoded(
        [ImageDataset(labelset, transform, read=read_encoded)[(r, s)] for r, s in zip(rows, seeds)])
    kept_seeds = [seeds[r] for r in indices.tolist()]
    images, kept, messages = decode_batch(items, indices, transform, "cpu", kept_seeds)
    assert kept.tolist() == cpu_rows.tolist() == [0, 5]
    assert torch.equal(images, cpu_images)
    assert sorted(bad + messages) == sorted(cpu_bad) and len(cpu_bad) == 5
    assert any(m.startswith(str(tmp_path / "truncated.jpg")) for m in messages)  # found by the batch decode


def test_a_batch_of_only_bad_jpegs_is_empty_not_an_error(tmp_path):
    item = EncodedJpeg(torch.frombuffer(bytearray(b"\xff\xd8" + bytes(64)), dtype=torch.uint8), "x.jpg")
    images, kept, messages = decode_batch([item], torch.tensor([4]), build_transform(32, False), "cpu")
    assert images.shape[0] == 0 and kept.tolist() == [] and messages[0].startswith("x.jpg: cannot decode image")


def test_the_loader_and_shards_carry_bytes_to_the_batch(grid, tmp_path):
    from mlic.data.shards import ShardDataset, write_shards

    transform = build_transform(64, train=True, augment="light")
    write_shards(grid, tmp_path / "shards", 4_000_000, progress=False, log=lambda *a: None)
    def shards(read=None):
        return ShardDataset(tmp_path / "shards", transform, seed=5, rank=0, world_size=1, read=read)

    reference = {}
    for images, _, rows, _ in make_loader(shards(), 8):
        reference.update(zip(rows.tolist(), images))
    dataset, seen = shards(read_encoded), 0
    for items, _, rows, bad in make_loader(dataset, 8, collate_fn=collate_encoded):
        assert bad == []
        seeds = [dataset.sample_seed(r) for r in rows.tolist()]
        images, kept, _ = decode_batch(items, rows, transform, "cpu", seeds)
        for row, image in zip(kept.tolist(), images):
            with Image.open(grid.path(row)) as probe:
                scale = _draft_scale(probe.size, transform.decode_size) if probe.format == "JPEG" else 1
            assert (image.int() - reference[row].int()).abs().max() <= (0 if scale == 1 else 2), grid.path(row)
            seen += 1
    assert seen == len(grid)


def test_decode_device_cuda_is_refused_without_cuda():
    check_decode_device("cpu", "cpu")
    with pytest.raises(MlicError, match=r"--decode-device cuda: CUDA is not available here \(the run trains on cpu\)"):
        check_decode_device("cuda", "cpu")
    with pytest.raises(MlicError, match="--decode-device 'tpu': choose one of cpu, cuda"):
        TrainConfig(decode_device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_decode_device_cuda_in_one_line_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from mlic.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--decode-device", "cuda", "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --decode-device cuda: CUDA is not available here (the run trains on cpu); drop the option to "
        "decode on the CPU workers"]
    assert not out.exists()


def test_fit_with_the_device_path_is_the_cpu_paths_run(tiny_digits, tmp_path, monkeypatch):
    """The wiring in fit: JPEG digits trained once per path (the device path on the CPU) give the same run."""
    import mlic.engine.loop as engine
    from mlic.config import ModelConfig
    from mlic.data.splits import Splits
    from mlic.engine.job import TrainJob
    from mlic.engine.run import fit

    splits, _, _ = tiny_digits

    def as_jpegs(labelset: LabelSet, folder) -> LabelSet:
        folder.mkdir()
        names = [f"{i:04d}.jpg" for i in range(len(labelset))]
        for i, name in enumerate(names):
            Image.open(labelset.path(i)).convert("RGB").save(folder / name, quality=95)
        return LabelSet(labelset.classes, names, np.asarray(labelset.targets), root=folder)

    train, val = as_jpegs(splits["train"], tmp_path / "train"), as_jpegs(splits["val"], tmp_path / "val")
    monkeypatch.setattr(engine, "check_decode_device", lambda *a: None)  # lets "cuda" run on this CPU
    calls = []
    monkeypatch.setattr(engine, "decode_batch", lambda *a: calls.append(1) or decode_batch(*a))
    results = {}
    for decode_device in ("cpu", "cuda"):
        cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, workers=0, seed=0, augment="light",
                          decode_device=decode_device)
        job = TrainJob(ModelConfig(num_classes=10, img_size=32), cfg, Splits(train, val, None),
                       tmp_path / decode_device, progress=False, log=lambda *a, **k: None)
        results[decode_device] = fit(job)
    assert len(calls) == 2 * (len(train) // 32)  # every training batch went through decode_batch
    losses = {d: [h["train_loss"] for h in r.history] for d, r in results.items()}
    assert losses["cuda"] == losses["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvjpeg); none on this machine")
def test_cuda_decode_matches_the_cpu_path(grid):
    """nvjpeg and float resizing differ from libjpeg-turbo and the uint8 resize by rounding; the geometry is the
    same. This bound has not been measured on a GPU yet (none was available when it was written)."""
    transform = build_transform(448, train=True, augment="light", hflip=True)
    rows = [k for k, p in enumerate(grid.image_paths) if p.endswith(".jpg") and "cmyk" not in p]
    seeds = [sample_seed(1, 0, r) for r in rows]
    cpu = torch.stack([ImageDataset(grid, transform)[(r, s)][0] for r, s in zip(rows, seeds)])
    items, _, indices, _ = collate_encoded([ImageDataset(grid, transform, read=read_encoded)[(r, s)]
                                            for r, s in zip(rows, seeds)])
    images, kept, messages = decode_batch(items, indices, transform, "cuda", seeds)
    assert images.device.type == "cuda" and messages == [] and kept.tolist() == rows
    diff = (images.cpu().int() - cpu.int()).abs().float()
    assert diff.mean() < 1.5, f"mean difference {diff.mean():.3f} levels"
