"""Atomic writes of files and folders, used by every writer in mlic.

Readers see either the old or the new version, never half of one: a file is written under a
temporary name in the same folder, flushed and renamed over the target; a folder is built beside
its target and swapped in. Files get the permissions the user's umask gives (not ``mkstemp``'s
0600). Temporary names start with a dot and end in ``.tmp``; :func:`remove_stale` clears those
an interrupted process left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from mlic.errors import MlicError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[tuple[IO[bytes], str]]:
    """A temporary file beside ``path`` (object, name), moved onto ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name lets remove_stale() tell a killed write's leftovers from a live one
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        _record_write(path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise fs_error(e, path) from None
        raise


_TRACKED: dict[Path, tuple[Path, set[str]]] = {}


def track_writes(folder: str | os.PathLike, manifest: str, owned: set[str]) -> None:
    """From now on, record in ``folder/manifest`` the top-level name of every file this module writes there.

    What a run wrote is then known exactly (``--overwrite`` removes that and nothing else), whichever
    writer wrote it. ``owned`` are the names recorded already (a resumed run's).
    """
    folder = Path(folder).resolve()
    _TRACKED[folder] = (folder / manifest, set(owned))
    _write_manifest(folder)


def _write_manifest(folder: Path) -> None:
    import json

    manifest, names = _TRACKED[folder]
    atomic_write_bytes(manifest, json.dumps({"files": sorted(names)}).encode())


def _record_write(path: Path) -> None:
    if not _TRACKED:
        return
    path = path.resolve()
    for folder, (manifest, names) in list(_TRACKED.items()):
        if path == manifest or folder not in path.parents:
            continue
        name = path.relative_to(folder).parts[0]
        if name not in names:
            names.add(name)
            _write_manifest(folder)


def fs_error(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` with the file it concerns: a failed write (a full disk) often carries no file name."""
    if e.filename:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never half."""
    with atomic_file(path) as (f, _):
        f.write(data)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically, streamed to disk (no second copy of the array in memory)."""
    with atomic_file(path) as (f, _):
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


@contextmanager
def atomic_npy_memmap(path: str | os.PathLike, dtype, shape: tuple[int, ...]) -> Iterator[np.memmap]:
    """A writable memory-mapped npy file that appears at ``path`` only when the block ends without error.

    Lets a writer fill an array larger than memory piece by piece, with the same all-or-nothing
    guarantee as :func:`atomic_save_npy`.
    """
    with atomic_file(path) as (f, tmp):
        if not np.prod(shape, dtype=np.int64):  # an empty file cannot be memory-mapped
            empty = np.zeros(shape, dtype)
            yield empty
            np.lib.format.write_array(f, empty, allow_pickle=False)
            return
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()


def temp_dir_for(final: str | os.PathLike) -> Path:
    """A new, empty folder beside ``final`` to build it in (``.<name>.<pid>-<random>.tmp``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    return tmp


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Swap the finished folder ``tmp`` in as ``final``, replacing whatever ``final`` held, as a whole.

    The old folder is renamed aside first and removed only after the new one is in place, so at every
    moment ``final`` is either the complete old folder or the complete new one.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old.tmp"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def folder_swap(final: str | os.PathLike, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build the folder ``final`` in a temporary folder beside it, swapped in as a whole when the block succeeds.

    Leftovers of killed builds of ``final`` are removed first; on an error the temporary folder is
    removed and ``final`` is untouched. ``keep_existing(final)``, checked after the block, may keep
    what another process finished meanwhile (the new build is then discarded).

    Example:
        >>> with folder_swap(out) as tmp:
        ...     (tmp / "labels.npy").write_bytes(data)
    """
    final = Path(final)
    remove_stale(final.parent, final.name)
    tmp = temp_dir_for(final)  # beside final, so relative paths stay right after the swap
    try:
        yield tmp
        if keep_existing is not None and keep_existing(final):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str | os.PathLike, name: str) -> int:
    """Remove temporary siblings of ``folder/name`` (files or folders) whose writing process is gone.

    Returns how many were removed. A temporary name carries its writer's pid; one of a live process
    (another build running right now) is left alone.
    """
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return 0
    for item in folder.glob(f".{name}.*.tmp"):
        pid_part = item.name[len(name) + 2:].split("-", 1)[0].split(".", 1)[0]
        if pid_part.isdigit() and _pid_alive(int(pid_part)) and int(pid_part) != os.getpid():
            continue
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        removed += 1
    return removed


TEMP_NAME = re.compile(r"^\..+\.(\d+)-[A-Za-z0-9_]+(\.old)?\.tmp$")
"""A temporary name of this module: ``.<name>.<pid>-<random>[.old].tmp``."""


def remove_stale_all(folder: str | os.PathLike) -> int:
    """Remove every temporary file or folder in ``folder`` whose writing process is gone.

    The next run that opens a folder calls this, so a killed write leaves nothing behind for long.
    Returns how many were removed.
    """
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return 0
    for item in folder.iterdir():
        match = TEMP_NAME.match(item.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        removed += 1
    return removed


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; raises OSError naming it.

    ``what`` names the option or variable that chose the folder (e.g. "--out", "MLIC_CACHE"), so the
    message says what to change.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", suffix=".tmp") as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}; {what} must be a writable folder", str(folder)) from None
    return folder


class UnsafeFileError(MlicError):
    """A torch file is not a checkpoint, or holds objects other than tensors and plain containers."""


def load_torch_weights(path: str | os.PathLike, allowed: list | None = None):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never arbitrary code.

    Args:
        path: a file written by ``torch.save``.
        allowed: extra harmless globals to accept (``torch.serialization.safe_globals`` entries).

    Raises:
        UnsafeFileError: one line naming the file: not a PyTorch file at all, or which foreign object it
            holds (refused; nothing in it was run).
    """
    import pickle
    import re
    import zipfile

    import torch

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise UnsafeFileError(f"{path}: not a checkpoint (not a file written by torch.save)")
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise UnsafeFileError(f"{path}: refused: it holds {found.group(1)}, not only tensors and plain "
                                  "containers; only weight files are accepted (nothing in it was run)") from None
        raise UnsafeFileError(f"{path}: not a checkpoint (unreadable as a weights file)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(f"{path}: not a readable checkpoint ({reason})") from None
