"""Writing shards: the folder layout, skipped images, prepare_shards swapped in whole, the CLI."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from mlic.data.images import build_transform
from mlic.data.shards import (
    ShardDataset,
    ShardError,
    ShardIndex,
    decode_row,
    open_data,
    parse_size,
    prepare_shards,
    write_shards,
)

SIZE = 64
N, K = 12, 5  # conftest's make_labelset


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("256MiB") == 256 << 20
    assert parse_size("12345") == 12345 and parse_size(" 1.5 kb ") == 1500
    for bad in ("1XB", "", "-3", "0", "GB"):
        with pytest.raises(ValueError, match="--shard-size"):
            parse_size(bad)


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


def test_missing_and_unreadable_images_are_counted_not_packed(tmp_path, make_labelset, rows):
    labelset = make_labelset(tmp_path / "data", observed=False)
    labelset.path(2).unlink()
    labelset.path(5).write_bytes(b"not an image")
    labelset.path(7).unlink()
    os.mkfifo(labelset.path(7))  # a pipe named .jpg: packing must not block on it
    labelset.path(9).write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")  # never Ghostscript
    lines = []
    write_shards(labelset, tmp_path / "out", 10**9, progress=False, log=lines.append)
    index = ShardIndex.read(tmp_path / "out")
    assert index.num_samples == N - 4 and index.observed is False
    assert [(s["index"], s["reason"].split(" (")[0]) for s in index.skipped] == [
        (2, "image not found"), (5, "not an image"), (7, "not a regular file"), (9, "not an image")]
    assert "EPS file, not a format mlic reads" in index.skipped[3]["reason"]
    assert len(lines) == 4 and "02.jpg: image not found" in lines[0]
    got = rows(ShardDataset(tmp_path / "out", build_transform(SIZE, train=False), shuffle=False))
    assert sorted(got) == [i for i in range(N) if i not in (2, 5, 7, 9)]


def test_prepare_shards_writes_every_split_and_replaces_as_a_whole(tmp_path, make_labelset, rows):
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


def test_cli_prepare_shards(tmp_path, make_labelset):
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


def test_truncated_tar_is_not_valid_before_index(tmp_path, make_labelset):
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
