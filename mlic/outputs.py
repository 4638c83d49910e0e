"""Where a command may write: the rules that keep every output path from destroying a user's file.

1. An output may only replace a file that mlic wrote as the same kind of output, recognised by its
   header or metadata (:data:`RECOGNISERS`); anything else needs ``--overwrite``.
2. An input of the same command is never an output, and two outputs never share a path (paths are
   compared resolved, so ``a.csv`` and ``./x/../a.csv`` are one path).
3. A folder a command writes into has one writer at a time (:func:`lock_folder`, a ``flock`` that dies
   with its process, so a SIGKILL never leaves a stale lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mlic.errors import MlicError


class OutputError(MlicError):
    """An output path would destroy something mlic did not write, or collides with another path."""


def _head(path: Path, size: int = 1 << 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _is_predictions_csv(path: Path) -> bool:
    import csv
    import io

    text = _head(path).decode("utf-8", "surrogateescape")
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error:
        return False
    return len(header) >= 3 and header[:2] == ["path", "labels"]  # a user's 2-column label table is not ours


def _is_predictions_jsonl(path: Path) -> bool:
    first = _head(path).split(b"\n", 1)[0]
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and {"path", "labels", "scores", "error"} <= set(row)


def _is_onnx_export(path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX at all: not ours
        return False
    return any(p.key == "mlic_classes" for p in model.metadata_props)


def _is_metrics_json(path: Path) -> bool:
    try:
        obj = json.loads(path.read_bytes())
    except ValueError:
        return False
    return isinstance(obj, dict) and "mAP" in obj and "per_class_ap" in obj


def _is_attention_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path, formats=["PNG"]) as im:
            return im.info.get("Software", "").startswith("mlic explain")
    except Exception:  # noqa: BLE001
        return False


RECOGNISERS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "predictions-csv": ("a CSV written by mlic predict (header path,labels,<classes>)", _is_predictions_csv),
    "predictions-jsonl": ("JSON lines written by mlic predict", _is_predictions_jsonl),
    "onnx": ("an ONNX file written by mlic export onnx", _is_onnx_export),
    "metrics-json": ("a metrics JSON written by mlic eval", _is_metrics_json),
    "attention-png": ("an attention map written by mlic predict --explain", _is_attention_png),
}
"""Each kind of single-file output: what it is, and how mlic recognises one it wrote."""


def written_by_mlic(path: str | os.PathLike, kind: str) -> bool:
    """Whether the existing file ``path`` is an output of ``kind`` that mlic wrote."""
    path = Path(path)
    try:
        return path.is_file() and RECOGNISERS[kind][1](path)
    except OSError:
        return False


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: resolved (symlinks, ``..``), or the same inode where both exist."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclass
class Output:
    """One file a command is about to write."""

    option: str
    """The option that named it, for the message (e.g. ``--csv``)."""
    path: Path
    kind: str
    """A key of :data:`RECOGNISERS`."""


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                  keep: bool = False) -> None:
    """Refuse outputs that would destroy a file mlic did not write, replace an input, or share a path.

    Args:
        outputs: the files the command will write.
        inputs: the files and folders it reads (a folder input protects the files directly named only).
        overwrite: ``--overwrite``: a file of any content may be replaced (inputs and collisions still refused).
        keep: ``--resume``: existing outputs are appended to, so they must be mlic's of the same kind.

    Raises:
        OutputError: one line naming the option, the path and what to do.
    """
    from mlic.io import remove_stale

    outputs = [o for o in outputs if o.path is not None]
    for out in outputs:  # what a killed write of the same output left behind
        remove_stale(out.path.parent, out.path.name)
    by_name: dict[str, list[Path]] = {}
    for source in map(Path, inputs):  # compared by name first: a million images cost no million resolves
        by_name.setdefault(source.name, []).append(source)
    claimed: dict[str, Output] = {}
    for out in outputs:
        if out.path.is_dir():
            raise OutputError(f"{out.option} {out.path}: is a folder; give a file name")
        resolved = str(out.path.resolve())
        if resolved in claimed:
            other = claimed[resolved]
            raise OutputError(f"{other.option} and {out.option} name the same file {out.path}; give each its own")
        claimed[resolved] = out
        for source in by_name.get(out.path.name, []) + by_name.get(Path(resolved).name, []):
            if source.is_file() and same_path(out.path, source):
                raise OutputError(f"{out.option} {out.path}: is an input of this command; write the output elsewhere")
        if not out.path.exists() or (overwrite and not keep):
            continue
        if not out.path.is_file():
            raise OutputError(f"{out.option} {out.path}: exists and is not a regular file; choose another path")
        what, recognise = RECOGNISERS[out.kind]
        if out.path.stat().st_size == 0 and keep:
            continue
        if not recognise(out.path):
            hint = "" if keep else ", or pass --overwrite to replace it"
            raise OutputError(f"{out.option} {out.path}: exists and is not {what}; choose another path{hint}")


_HELD: dict[str, int] = {}


def lock_folder(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Take the one-writer lock of ``folder`` for the rest of this process (``folder/.mlic.lock``).

    The lock is an ``flock`` on an open file: the kernel drops it when the process ends, however it ends,
    so a killed run never leaves a stale lock. Taking it again in the same process is a no-op.

    Raises:
        OutputError: another process holds it (the message names its pid and command).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".mlic.lock"
    key = str(lock.resolve())
    if key in _HELD:
        return folder
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise OutputError(f"{folder}: {what} is being written by {holder}; wait for it to finish or choose "
                          f"another {what}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:300]})".encode(), 0)
    _HELD[key] = fd
    return folder


def unlock_folder(folder: str | os.PathLike) -> None:
    """Release the lock :func:`lock_folder` took (it is released at exit anyway)."""
    key = str((Path(folder) / ".mlic.lock").resolve())
    fd = _HELD.pop(key, None)
    if fd is not None:
        os.close(fd)
