"""Writing shards: pack a LabelSet into WebDataset tars (:func:`write_shards`), and a prepared folder's
splits into shard folders swapped in as a whole (:func:`prepare_shards`, ``mlic prepare shards``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

from mlic.data.labelset import LabelSet, LabelSetError
from mlic.data.shards.index import FORMAT_VERSION, INDEX_NAME, LABELS_DIR, SPLITS, ShardError, ShardIndex
from mlic.data.shards.row_code import encode_row
from mlic.data.shards.tar import END_OF_ARCHIVE, member_size
from mlic.errors import MlicError
from mlic.io import atomic_file, atomic_write_bytes, folder_swap
from mlic.progress import progress_bar

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``--shard-size``: bytes, or a number with KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (of 1024)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text), re.IGNORECASE)
    unit = found.group(2).upper() if found else None
    if unit not in _UNITS or unit == "I":
        raise MlicError(f"--shard-size {text!r}: write bytes or a size like 1GB, 500MB, 256MiB")
    size = int(float(found.group(1)) * _UNITS[unit])
    if size < 1:
        raise MlicError(f"--shard-size {text!r}: must be at least 1 byte")
    return size


def _image_bytes(labelset: LabelSet, i: int) -> tuple[bytes | None, str]:
    """The file's bytes and "", or None and why it cannot be packed (missing, unreadable, not an image)."""
    import stat

    from mlic.data.images import ImageError, open_image

    path = labelset.path(i)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read forever
            return None, "not a regular file (a pipe, socket or device)"
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "image not found"
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"
    try:  # the header only (~50 µs), in the formats mlic reads: a truncated body fails at training, counted
        open_image(io.BytesIO(data), path).close()
    except ImageError as e:
        return None, f"not an image ({str(e).removeprefix(f'{path}: ')})"
    except Exception as e:  # noqa: BLE001 - a corrupt header of an allowed format: PIL raises anything
        return None, f"not an image ({e})"
    return data, ""


def write_shards(labelset: LabelSet, out_dir: str | os.PathLike, shard_size_bytes: int, progress: bool = True,
                 log=print) -> list[Path]:
    """Pack ``labelset`` into WebDataset shards ``out_dir/shard-000000.tar`` … plus ``index.json`` and ``labels/``.

    A shard is closed before the sample that would take it past ``shard_size_bytes`` (every shard holds at
    least one sample; tar pads its last record, so a file may pass the size by up to 10 KiB). Images that are
    missing, unreadable or not images are not packed: each is logged (one line) and listed under ``skipped`` in
    index.json.

    Args:
        labelset: images and labels (targets dense or :class:`SparseTargets`; observed labels kept too).
        out_dir: the shard folder (created; shards of an earlier write that the new index does not list are
            removed after index.json is written).
        shard_size_bytes: the most bytes a shard holds (tar headers included), unless one sample alone is larger.
        progress: progress bar over the images.
        log: where the one-line reports of skipped images go.

    Returns:
        The shard paths, in order.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(labelset)
    shards, samples, skipped = [], [], []
    writer = handle = None
    shard_bytes = 0
    bar = progress_bar(n, f"shards {labelset.split or out_dir.name}", enabled=progress and n > 0)

    def close_shard():
        writer.close()
        handle.__exit__(None, None, None)  # flush, fsync, rename onto shard-NNNNNN.tar

    try:
        for i in range(n):
            data, reason = _image_bytes(labelset, i)
            bar.advance()
            rel = str(labelset.image_paths[i])
            if data is None:
                skipped.append({"index": i, "path": rel, "reason": reason})
                log(f"skipped {labelset.path(i)}: {reason}")
                continue
            entry = {"index": i, "path": rel, "targets": encode_row(labelset.targets[i])}
            if labelset.observed is not None:
                entry["observed"] = encode_row(labelset.observed[i])
            ext = Path(rel).suffix.lower().lstrip(".") or "img"
            sample = {"__key__": f"{i:09d}", ext: data, "labels.json": json.dumps(entry).encode()}
            size = sum(member_size(sample[name]) for name in (ext, "labels.json"))
            if writer is not None and shard_bytes + size + END_OF_ARCHIVE > shard_size_bytes:
                close_shard()
                writer = None
            if writer is None:
                shards.append(out_dir / f"shard-{len(shards):06d}.tar")
                samples.append(0)
                handle = atomic_file(shards[-1])
                writer = wds.TarWriter(handle.__enter__()[0], encoder=False, mtime=0)
                shard_bytes = 0
            writer.write(sample)
            samples[-1] += 1
            shard_bytes += size
        if writer is not None:
            close_shard()
            writer = None
    except BaseException:
        if writer is not None:  # drop the half-written shard; the finished ones stay
            with contextlib.suppress(Exception):
                writer.close()  # into the temporary file, deleted next
            handle.__exit__(*sys.exc_info())
        raise
    finally:
        bar.close()
    labelset.save(out_dir / LABELS_DIR)
    index = {"format": FORMAT_VERSION, "split": labelset.split, "classes": list(labelset.classes),
             "num_rows": n, "shards": [p.name for p in shards], "samples": samples,
             "observed": labelset.observed is not None, "skipped": skipped, "meta": labelset.meta}
    atomic_write_bytes(out_dir / INDEX_NAME, json.dumps(index).encode())
    listed = {p.name for p in shards}
    for old in out_dir.glob("shard-*.tar"):
        if old.name not in listed:
            old.unlink()
    return shards


def _load_splits(data: Path) -> dict[str, LabelSet]:
    if (data / "labelset.json").is_file():
        labelset = LabelSet.load(data)
        return {labelset.split or "train": labelset}
    found = {s: LabelSet.load(data / s) for s in SPLITS if (data / s / "labelset.json").is_file()}
    if not found:
        raise LabelSetError(f"{data}: no prepared LabelSet (train/ val/ test/) inside; run 'mlic prepare' first")
    return found


def prepare_shards(data: str | os.PathLike, out: str | os.PathLike, shard_size: str | int, progress: bool = True,
                   log=print) -> dict[str, ShardIndex]:
    """``mlic prepare shards``: one shard folder per split of a prepared folder, ``out/<split>/``.

    ``out`` is built beside itself and swapped in as a whole; it may be absent, empty or an earlier shard folder.

    Returns:
        {split: its :class:`ShardIndex`}.
    """
    data, out = Path(data), Path(out)
    size = parse_size(shard_size)
    sets = _load_splits(data)
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: --out is a file; give a folder for the shards")
    if out.exists():
        others = [p.name for p in out.iterdir() if not p.name.startswith(".") and not (p / INDEX_NAME).is_file()]
        if others:
            raise ShardError(f"{out}: holds {', '.join(sorted(others)[:3])}, not only shard folders; --out is "
                             "replaced as a whole, so choose a new or empty folder")
    with folder_swap(out) as tmp:
        for split, labelset in sets.items():
            write_shards(labelset, tmp / split, size, progress=progress, log=log)
    return {split: ShardIndex.read(out / split) for split in sets}
