"""mlic.io: atomic files and folders, stale temporaries, the writable check, the safe torch loader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlic.io import (
    UnsafeFileError,
    atomic_file,
    atomic_npy_memmap,
    atomic_save_npy,
    atomic_write_bytes,
    check_writable,
    folder_swap,
    load_torch_weights,
    remove_stale,
    remove_stale_all,
)


class Boom(Exception):
    pass


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def pids():
    """(pid of a live process other than this one, pid of a process that has exited)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    yield live.pid, dead.pid
    live.kill()
    live.wait()


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and names(path.parent) == {"a.bin"}


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_file(path) as (f, tmp):
            f.write(b"half of the new")
            assert Path(tmp).exists() and Path(tmp).name.startswith(f".a.bin.{os.getpid()}-")
            raise Boom
    assert path.read_bytes() == b"old" and names(tmp_path) == {"a.bin"}


def test_failed_npy_writes_leave_nothing(tmp_path, monkeypatch):
    with pytest.raises(Boom):
        with atomic_npy_memmap(tmp_path / "m.npy", np.float32, (4, 3)) as array:
            array[:2] = 1
            raise Boom

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left") as caught:
            atomic_save_npy(tmp_path / "s.npy", np.zeros(3))
    assert caught.value.filename == str(tmp_path / "s.npy")  # the error names the file it was writing
    assert names(tmp_path) == set()
    with atomic_npy_memmap(tmp_path / "m.npy", np.float32, (4, 3)) as array:
        array[:] = 2
    atomic_save_npy(tmp_path / "s.npy", np.arange(3))
    assert np.load(tmp_path / "m.npy").sum() == 24 and np.load(tmp_path / "s.npy").tolist() == [0, 1, 2]
    assert names(tmp_path) == {"m.npy", "s.npy"}


def test_remove_stale_keeps_a_live_writers_temp(tmp_path, pids):
    live, dead = pids
    (tmp_path / "data").mkdir()
    kept = tmp_path / f".data.{live}-aaaa1111.tmp"
    gone_dir = tmp_path / f".data.{dead}-bbbb2222.tmp"
    gone_old = tmp_path / f".data.{dead}-cccc3333.old.tmp"
    other = tmp_path / f".other.{dead}-dddd4444.tmp"  # another target's: not this call's business
    kept.write_bytes(b"")
    gone_dir.mkdir()
    (gone_dir / "inside").write_bytes(b"x")
    gone_old.mkdir()
    other.write_bytes(b"")
    assert remove_stale(tmp_path, "data") == 2
    assert names(tmp_path) == {"data", kept.name, other.name}
    assert remove_stale(tmp_path / "absent", "data") == 0


def test_remove_stale_all_keeps_live_temps_and_real_files(tmp_path, pids):
    live, dead = pids
    for name in (f".a.{live}-1111aaaa.tmp", f".b.{dead}-2222bbbb.tmp", f".c.npy.{dead}-3333cccc.old.tmp",
                 "model.json", ".hidden", ".d.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_all(tmp_path) == 2
    assert names(tmp_path) == {f".a.{live}-1111aaaa.tmp", "model.json", ".hidden", ".d.tmp"}


def test_folder_swap_builds_beside_and_swaps_in(tmp_path, pids):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    stale = tmp_path / f".out.{pids[1]}-5555eeee.tmp"  # a killed build's leftover
    stale.mkdir()
    with folder_swap(final) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not stale.exists()
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # readers see the old folder until the swap
    assert names(final) == {"new.txt"} and names(tmp_path) == {"out"}


def test_folder_swap_failure_keeps_the_old_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with folder_swap(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise Boom
    assert names(final) == {"old.txt"} and names(tmp_path) == {"out"}
    with pytest.raises(Boom):
        with folder_swap(tmp_path / "fresh"):
            raise Boom
    assert names(tmp_path) == {"out"}


def test_folder_swap_keep_existing_discards_the_second_build(tmp_path):
    final = tmp_path / "cache"

    def done(folder):
        return (folder / "done").exists()

    with folder_swap(final, keep_existing=done) as tmp:
        (tmp / "done").write_text("first")
    with folder_swap(final, keep_existing=done) as tmp:
        (tmp / "done").write_text("second")  # another process finished first: its folder is kept
    assert (final / "done").read_text() == "first" and names(tmp_path) == {"cache"}


def test_check_writable_names_the_option(tmp_path):
    assert check_writable(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert names(tmp_path / "a" / "b") == set()  # the probe file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="MLIC_CACHE must be a writable folder") as caught:
        check_writable(tmp_path / "file" / "cache", "MLIC_CACHE")
    assert caught.value.filename == str(tmp_path / "file" / "cache")


class Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_load_torch_weights_loads_tensors(tmp_path):
    torch.save({"w": torch.ones(2), "meta": {"n": 1, "names": ["a"]}}, tmp_path / "ok.pt")
    loaded = load_torch_weights(tmp_path / "ok.pt")
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["meta"] == {"n": 1, "names": ["a"]}


def test_load_torch_weights_refuses_objects_and_other_files(tmp_path, capsys):
    torch.save({"w": torch.ones(1), "x": Payload()}, tmp_path / "evil.pt")
    refused = r"evil.pt: refused: it holds (builtins\.)?print, not only tensors"
    with pytest.raises(UnsafeFileError, match=refused) as caught:
        load_torch_weights(tmp_path / "evil.pt")
    assert "nothing in it was run" in str(caught.value) and "ran" not in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(UnsafeFileError, match="notes.txt: not a checkpoint"):
        load_torch_weights(tmp_path / "notes.txt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "evil.pt").read_bytes()[:40])  # a truncated zip
    with pytest.raises(UnsafeFileError, match="cut.pt: not a"):
        load_torch_weights(tmp_path / "cut.pt")


def test_a_failed_write_names_its_file(tmp_path, monkeypatch):
    import errno
    import os

    from mlic.io import atomic_write_bytes

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(tmp_path / "model.json", b"{}")
    assert err.value.filename == str(tmp_path / "model.json") and not list(tmp_path.iterdir())
