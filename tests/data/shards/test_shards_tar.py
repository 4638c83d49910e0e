"""The tar primitives: the reader reads what tarfile writes, member sizes as tarfile lays them out."""

from __future__ import annotations

import io
import tarfile

import pytest

from mlic.data.shards.tar import END_OF_ARCHIVE, member_size, tar_members


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, tar_format):
    """The shard reader reads what tar writes: ustar prefixes, GNU long names, pax headers (webdataset's with a
    float mtime), directories skipped."""
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
        assert list(tar_members(f)) == expected and len(expected) >= 5


def test_member_size_is_what_tarfile_writes(tmp_path):
    """The size write_shards plans a shard with: a member takes what tarfile's ustar writer gives it."""
    sizes = [0, 1, 511, 512, 513, 2000]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, size in enumerate(sizes):
            info = tarfile.TarInfo(f"{k}.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()] + [tar.offset]
    assert [member_size(bytes(s)) for s in sizes] == [b - a for a, b in zip(offsets, offsets[1:])]
    assert END_OF_ARCHIVE == 1024
