"""WebDataset shards: round trip against ImageDataset, rank/worker split, seeded shuffling, damaged shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mlic.data.images import ImageDataset, build_transform, collate
from mlic.data.labelset import LabelSet
from mlic.data.shards import (
    ShardDataset,
    ShardError,
    ShardIndex,
    decode_row,
    encode_row,
    is_shards,
    open_data,
    parse_size,
    prepare_shards,
    write_shards,
)
from mlic.data.targets import SparseTargets

SIZE = 64
N, K = 12, 5


def make_labelset(root, sparse: bool = False, observed: bool = True) -> LabelSet:
    """N real images (640x480 JPEGs and a few PNGs) with random full targets and partial observed labels."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    paths = []
    for i in range(N):
        y, x = np.mgrid[0:480, 0:640]
        pixels = np.stack([(x * (i + 1)) % 256, (y * 3 + i * 20) % 256, (x + y) % 256], -1).astype(np.uint8)
        name = f"img/{i:02d}.{'png' if i % 4 == 3 else 'jpg'}"
        Image.fromarray(pixels).save(root / name)
        paths.append(name)
    targets = rng.integers(0, 2, (N, K)).astype(np.int8)
    obs = np.where(rng.random((N, K)) < 0.5, targets, -1).astype(np.int8) if observed else None
    if sparse:
        targets = SparseTargets.from_dense(targets)
        obs = SparseTargets.from_dense(obs) if obs is not None else None
    return LabelSet([f"c{k}" for k in range(K)], paths, targets, str(root), "train", obs, {"source": "test"})


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    labelset = make_labelset(root / "data")
    shards = write_shards(labelset, root / "out", shard_size_bytes=150_000, progress=False)
    return labelset, root / "out", shards


def rows(dataset) -> dict[int, tuple]:
    return {int(index): (image, target, error) for image, target, index, error in dataset}


def test_size_and_row_codes():
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("256MiB") == 256 << 20
    assert parse_size("12345") == 12345 and parse_size(" 1.5 kb ") == 1500
    for bad in ("1XB", "", "-3", "0", "GB"):
        with pytest.raises(ValueError, match="--shard-size"):
            parse_size(bad)
    for row in ([0, 0, 1, 0, -1], [-1, -1, 1, 0, -1], [1, 1, 1, 1, 1], []):
        row = np.array(row, np.int8)
        code = encode_row(row)
        np.testing.assert_array_equal(decode_row(json.loads(json.dumps(code)), row.size), row)
    assert encode_row(np.array([0, 0, 1, 0, -1], np.int8)) == {"fill": 0, "1": [2], "-1": [4]}


def test_written_layout(packed):
    labelset, out, shards = packed
    assert len(shards) > 2 and [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(len(shards))]
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == 1 and index["classes"] == labelset.classes and index["split"] == "train"
    assert sum(index["samples"]) == N and index["skipped"] == [] and index["observed"] is True
    assert index["meta"] == {"source": "test"}
    assert all(p.stat().st_size <= 150_000 + 10240 for p in shards[:-1])  # tar's end record pads to 10 KiB
    assert not list(out.glob(".*tmp"))
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        image_name = names[0]
        entry = json.loads(tar.extractfile(names[1]).read())
        assert names[1] == image_name.split(".")[0] + ".labels.json"
        i = entry["index"]
        assert tar.extractfile(image_name).read() == labelset.path(i).read_bytes()  # the file's bytes, not re-encoded
        assert image_name.endswith(labelset.image_paths[i].rsplit(".", 1)[1])
    np.testing.assert_array_equal(decode_row(entry["targets"], K), labelset.targets[i])
    np.testing.assert_array_equal(decode_row(entry["observed"], K), labelset.observed[i])
    copy = ShardIndex.read(out).labelset()
    np.testing.assert_array_equal(np.asarray(copy.observed), np.asarray(labelset.observed))
    assert copy.path(0) == labelset.path(0)


def test_same_rows_as_image_dataset(packed):
    labelset, out, _ = packed
    transform = build_transform(SIZE, train=False)
    folder = ImageDataset(labelset, transform)
    streamed = rows(ShardDataset(out, transform, shuffle=False))
    assert sorted(streamed) == list(range(N))
    for i, (image, target, error) in streamed.items():
        ref_image, ref_target, ref_index, ref_error = folder[i]
        assert error is None and ref_error is None and ref_index == i
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
        assert torch.equal(image, ref_image) and torch.equal(target, ref_target) and target.dtype == torch.int8
    clean = rows(ShardDataset(out, transform, targets="clean", shuffle=False))
    for i, (_, target, _) in clean.items():
        np.testing.assert_array_equal(target.numpy(), labelset.targets[i])
    # training: each sample's augmentation runs under its own seed, as ImageDataset[(row, seed)] does
    train = build_transform(SIZE, train=True, augment="light")
    streamed = ShardDataset(out, train, seed=5, buffer=4)
    streamed.set_epoch(2)
    folder = ImageDataset(labelset, train)
    drawn = rows(streamed)
    for i, (image, _, _) in drawn.items():
        assert torch.equal(image, folder[(i, streamed.sample_seed(i))][0])
    assert any(not torch.equal(image, ImageDataset(labelset, transform)[i][0]) for i, (image, _, _) in drawn.items())
    # the same draws whatever the rank/worker split
    halves = [ShardDataset(out, train, seed=5, buffer=4, rank=r, world_size=2) for r in range(2)]
    for half in halves:
        half.set_epoch(2)
        assert all(torch.equal(image, drawn[i][0]) for i, (image, _, _) in rows(half).items())


def test_sparse_targets_and_collate(tmp_path):
    labelset = make_labelset(tmp_path / "data", sparse=True)
    write_shards(labelset, tmp_path / "out", 10**9, progress=False)
    dataset = ShardDataset(tmp_path / "out", build_transform(SIZE, train=False), seed=1)
    images, targets, indices, errors = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate)))
    assert images.shape == (5, 3, SIZE, SIZE) and targets.shape == (5, K) and errors == []
    np.testing.assert_array_equal(targets.numpy(), labelset.observed[indices.numpy()])


def test_every_sample_once_across_ranks_and_workers(packed):
    """2 simulated DDP ranks x 2 DataLoader workers, 2 epochs: each sample once per epoch, ranks disjoint."""
    _, out, shards = packed
    transform = build_transform(SIZE, train=False)
    datasets = [ShardDataset(out, transform, seed=7, rank=rank, world_size=2, buffer=4) for rank in range(2)]
    loaders = [DataLoader(d, batch_size=2, num_workers=2, collate_fn=collate, persistent_workers=True)
               for d in datasets]
    assignments = []
    for epoch in range(2):
        per_rank = []
        for dataset, loader in zip(datasets, loaders):
            dataset.set_epoch(epoch)
            batches = list(loader)
            got = [int(i) for _, _, idx, _ in batches for i in idx]
            assert len(got) == len(dataset) and len(batches) == dataset.num_batches(2, num_workers=2)
            assert dataset.num_batches(2, num_workers=2) == datasets[0].num_batches(2, 2, rank=dataset.rank)
            per_rank.append(got)
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N)) and all(per_rank)
    for epoch in range(6):  # shards move between ranks from epoch to epoch (seeded)
        datasets[0].set_epoch(epoch)
        assignments.append(datasets[0].shards_for(0))
    assert len({tuple(sorted(a)) for a in assignments}) > 1


def test_persistent_workers_follow_set_epoch(packed):
    _, out, _ = packed
    dataset = ShardDataset(out, build_transform(SIZE, train=False), seed=7, buffer=4)
    loader = DataLoader(dataset, batch_size=N, num_workers=1, collate_fn=collate, persistent_workers=True)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append([int(i) for _, _, idx, _ in loader for i in idx])
    single = ShardDataset(out, build_transform(SIZE, train=False), seed=7, buffer=4)
    single.set_epoch(1)
    assert orders[0] == orders[2] != orders[1]
    assert orders[1] == [int(r[2]) for r in single]  # a worker reads what the main process would


def test_shuffle_is_seeded_and_changes_with_epoch(packed):
    _, out, _ = packed
    transform = build_transform(SIZE, train=False)

    def order(seed, epoch):
        dataset = ShardDataset(out, transform, seed=seed, buffer=5)
        dataset.set_epoch(epoch)
        return [index for _, _, index, _ in dataset]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(N))
    assert [i for _, _, i, _ in ShardDataset(out, transform, shuffle=False)] == list(range(N))


def test_rank_and_world_from_torchrun_variables(packed, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dataset = ShardDataset(packed[1], build_transform(SIZE, train=False))
    assert (dataset.rank, dataset.world_size) == (1, 2)
    other = ShardDataset(packed[1], build_transform(SIZE, train=False), rank=0, world_size=2)
    assert len(dataset) + len(other) == N
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardDataset(packed[1], build_transform(SIZE, train=False), rank=2)


def test_fewer_shards_than_ranks_or_workers(tmp_path, packed):
    labelset = packed[0]
    write_shards(labelset, tmp_path / "one", 10**9, progress=False)
    transform = build_transform(SIZE, train=False)
    with pytest.raises(ShardError, match="1 shards for 2 ranks.*--shard-size"):
        ShardDataset(tmp_path / "one", transform, rank=0, world_size=2)
    dataset = ShardDataset(tmp_path / "one", transform, buffer=3)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate)
    assert sorted(int(i) for _, _, idx, _ in loader for i in idx) == list(range(N))  # worker 1 reads nothing
    assert dataset.num_batches(4, num_workers=2) == 3


def test_missing_and_unreadable_images_are_counted_not_packed(tmp_path):
    labelset = make_labelset(tmp_path / "data", observed=False)
    labelset.path(2).unlink()
    labelset.path(5).write_bytes(b"not an image")
    lines = []
    write_shards(labelset, tmp_path / "out", 10**9, progress=False, log=lines.append)
    index = ShardIndex.read(tmp_path / "out")
    assert index.num_samples == N - 2 and index.observed is False
    assert [(s["index"], s["reason"].split(" (")[0]) for s in index.skipped] == [(2, "image not found"),
                                                                                 (5, "not an image")]
    assert len(lines) == 2 and "02.jpg: image not found" in lines[0]
    got = rows(ShardDataset(tmp_path / "out", build_transform(SIZE, train=False), shuffle=False))
    assert sorted(got) == [i for i in range(N) if i not in (2, 5)]


def test_truncated_shard_is_a_clear_error(packed, tmp_path):
    _, out, shards = packed
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in [out / "index.json", *shards]:
        (broken / p.name).write_bytes(p.read_bytes())
    data = shards[1].read_bytes()
    (broken / shards[1].name).write_bytes(data[: len(data) // 2])
    dataset = ShardDataset(broken, build_transform(SIZE, train=False), shuffle=False)
    with pytest.raises(ShardError, match=rf"{shards[1].name}: truncated or corrupt.*mlic prepare shards"):
        list(dataset)
    # cut at a member boundary: the end-of-archive marker is missing
    with tarfile.open(shards[1]) as tar:
        members = tar.getmembers()
    (broken / shards[1].name).write_bytes(data[: members[2].offset])
    with pytest.raises(ShardError, match=rf"{shards[1].name}: truncated or corrupt after \d+ of \d+ samples \(no end"):
        list(dataset)
    # a whole tar with fewer samples than index.json lists
    with tarfile.open(broken / shards[1].name, "w") as tar:
        with tarfile.open(shards[1]) as source:
            for member in source.getmembers()[:2]:
                tar.addfile(member, source.extractfile(member))
    with pytest.raises(ShardError, match=rf"{shards[1].name}: holds 1 samples but index.json lists"):
        list(dataset)
    # a damaged header
    damaged = bytearray(data)
    damaged[members[2].offset + 10] ^= 0xFF
    (broken / shards[1].name).write_bytes(bytes(damaged))
    with pytest.raises(ShardError, match=r"truncated or corrupt after \d+ of .*bad header checksum"):
        list(dataset)
    (broken / shards[1].name).write_bytes(data[: members[2].offset])
    # and the error arrives as one line through a DataLoader worker
    batches = iter(DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate))
    with pytest.raises(ShardError) as caught:
        list(batches)
    batches._shutdown_workers()  # now, not when the garbage collector gets to it (seconds later, in another test)
    assert "\n" not in str(caught.value) and shards[1].name in str(caught.value)


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, tar_format):
    """The shard reader reads what tar writes: ustar prefixes, GNU long names, pax headers (webdataset's with a
    float mtime), directories skipped."""
    from mlic.data.shards import _tar_members

    names = ["a.jpg", "a.labels.json", "dir/" + "x" * 120 + ".png", "d" * 120 + "/b.png", "é.cls", "empty.txt"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for k, name in enumerate(names):
            if tar_format == tarfile.USTAR_FORMAT and len(name.rsplit("/", 1)[-1]) > 100:
                continue  # ustar cannot store a base name that long
            data = bytes(range(k * 7 % 256)) * (k + 1)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    with open(path, "rb") as f:
        assert list(_tar_members(f)) == expected and len(expected) >= 5


def test_missing_label_entry_is_a_clear_error(packed, tmp_path):
    _, out, shards = packed
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_bytes((out / "index.json").read_bytes())
    for p in shards:
        (broken / p.name).write_bytes(p.read_bytes())
    with tarfile.open(shards[0]) as source, tarfile.open(broken / shards[0].name, "w") as target:
        members = source.getmembers()
        key = members[0].name.split(".")[0]
        for member in members:
            if member.name != f"{key}.labels.json":  # the first sample loses its labels
                target.addfile(member, source.extractfile(member))
    with pytest.raises(ShardError, match=rf"{shards[0].name}: sample {key} has no labels entry"):
        list(ShardDataset(broken, build_transform(SIZE, train=False), shuffle=False))


def test_undecodable_image_inside_a_shard_is_a_counted_row(tmp_path):
    labelset = make_labelset(tmp_path / "data", observed=False)
    data = labelset.path(0).read_bytes()
    labelset.path(0).write_bytes(data[: len(data) // 3])  # a truncated JPEG: header fine, body not
    write_shards(labelset, tmp_path / "out", 10**9, progress=False)
    got = rows(ShardDataset(tmp_path / "out", build_transform(SIZE, train=False), shuffle=False))
    image, target, error = got[0]
    assert image is None and "shard-000000.tar:img/00.jpg" in error and target.shape == (K,)
    images, _, indices, errors = collate([(image, target, 0, error)] + [(*got[1][:2], 1, None)])
    assert indices.tolist() == [1] and errors == [error]


def test_sources_pipe_and_open_data(packed, tmp_path):
    labelset, out, _ = packed
    transform = build_transform(SIZE, train=False)
    piped = rows(ShardDataset(f"pipe:cat {out}/{{shard}}", transform, shuffle=False))
    local = rows(ShardDataset(out, transform, shuffle=False))
    assert sorted(piped) == sorted(local) and all(torch.equal(piped[i][0], local[i][0]) for i in local)
    with pytest.raises(ShardError, match="needs \\{shard\\}"):
        ShardIndex.read(f"pipe:cat {out}")
    with pytest.raises(ShardError, match="index.json: not found.*mlic prepare shards"):
        ShardIndex.read(tmp_path)
    assert is_shards(out) and not is_shards(tmp_path)
    assert list(open_data(out)) == ["train"]
    with pytest.raises(ShardError, match="no index.json"):
        open_data(tmp_path)


def test_prepare_shards_writes_every_split_and_replaces_as_a_whole(tmp_path):
    labelset = make_labelset(tmp_path / "data", observed=False)
    labelset.subset(range(8), "train").save(tmp_path / "prep" / "train")
    labelset.subset(range(8, N), "test").save(tmp_path / "prep" / "test")
    written = prepare_shards(tmp_path / "prep", tmp_path / "sh", "200KB", progress=False)
    assert {s: i.num_samples for s, i in written.items()} == {"train": 8, "test": 4}
    found = open_data(tmp_path / "sh")
    assert sorted(found) == ["test", "train"]
    test_rows = rows(ShardDataset(found["test"], build_transform(SIZE, train=False), shuffle=False))
    assert sorted(test_rows) == [0, 1, 2, 3]  # row indices of the test LabelSet
    assert ShardIndex.read(tmp_path / "sh" / "test").labelset().image_paths == labelset.image_paths[8:]
    prepare_shards(tmp_path / "prep", tmp_path / "sh", "1GB", progress=False)  # rewrite in place
    assert len(ShardIndex.read(tmp_path / "sh" / "train").shards) == 1
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(ShardError, match="notes.txt, not only shard folders"):
        prepare_shards(tmp_path / "prep", tmp_path / "other", "1GB", progress=False)
    with pytest.raises(ShardError, match="--out is a file"):
        prepare_shards(tmp_path / "prep", tmp_path / "other" / "notes.txt", "1GB", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"


def test_cli_prepare_shards(tmp_path):
    from typer.testing import CliRunner

    from mlic.cli import app

    labelset = make_labelset(tmp_path / "data", observed=False)
    labelset.save(tmp_path / "prep" / "train")
    labelset.path(4).unlink()
    result = CliRunner().invoke(app, ["prepare", "shards", "--data", str(tmp_path / "prep"), "--out",
                                      str(tmp_path / "sh"), "--shard-size", "300KB"])
    assert result.exit_code == 0, result.output
    assert "train      11 images" in result.output and "(1 unreadable, not packed)" in result.output
    assert "04.jpg: image not found" in result.output
    result = CliRunner().invoke(app, ["prepare", "shards", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "needs --data" in result.output
    result = CliRunner().invoke(app, ["prepare", "shards", "--data", str(tmp_path / "prep"), "--out",
                                      str(tmp_path / "y"), "--shard-size", "big"])
    assert result.exit_code == 2 and "--shard-size 'big'" in result.output
    result = CliRunner().invoke(app, ["prepare", "shards", "--data", str(tmp_path / "prep"), "--out",
                                      str(tmp_path / "y"), "--observe", "single-positive"])
    assert result.exit_code == 2 and "belong to preparing it" in result.output
    result = CliRunner().invoke(app, ["prepare", "coco", "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "needs --root" in result.output
    result = CliRunner().invoke(app, ["prepare", "coco", "--root", str(tmp_path), "--out", str(tmp_path / "z"),
                                      "--shard-size", "1GB"])
    assert result.exit_code == 2 and "belong to 'mlic prepare shards'" in result.output


def test_truncated_tar_is_not_valid_before_index(tmp_path):
    """index.json is written last: a folder whose write stopped early is refused as a whole."""
    labelset = make_labelset(tmp_path / "data", observed=False)

    def boom(line):
        raise KeyboardInterrupt

    labelset.path(6).unlink()
    with pytest.raises(KeyboardInterrupt):
        write_shards(labelset, tmp_path / "out", 100_000, progress=False, log=boom)
    assert not (tmp_path / "out" / "index.json").exists() and not list((tmp_path / "out").glob(".*tmp"))
    assert all(tarfile.open(p).getnames() for p in (tmp_path / "out").glob("shard-*.tar"))  # finished ones are whole
    with pytest.raises(ShardError, match="not found"):
        ShardDataset(tmp_path / "out", build_transform(SIZE, train=False))
