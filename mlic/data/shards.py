"""WebDataset shards: pack a LabelSet into tar files and stream them back as :class:`ImageDataset` rows.

A shard folder (one per split) holds::

    shard-000000.tar …  WebDataset tars; per sample (key = the 9-digit dataset row index):
                        <key>.<ext>          the image file's bytes as on disk (not re-encoded; its extension)
                        <key>.labels.json    {"index": row, "path": image path, "targets": row code,
                                              ["observed": row code]}  (code: :func:`encode_row`)
    index.json          {"format", "split", "classes", "num_rows", "shards": [names], "samples": [count per
                         shard], "observed", "skipped": [{"index", "path", "reason"}], "meta"}; written last
    labels/             the LabelSet itself (classes, clean and observed targets; its image root points at
                        the original images), so training has every label without reading a shard

Every shard and index.json is written atomically; ``mlic prepare shards`` builds the whole folder beside
its target and swaps it in, so an interrupted run leaves the previous shards as they were.

:class:`ShardDataset` streams the shards of a folder (or any URL webdataset's ``gopen`` opens: ``pipe:``,
``http(s)://``, …): each DDP rank, then each DataLoader worker, reads its own shards, samples pass a seeded
shuffle buffer, and images decode through :func:`mlic.data.images.read_image` with the caller's transform,
so a row is the same ``(uint8 image (3, S, S) or None, int8 targets (K,), index, error or None)`` as the folder
path gives and :func:`mlic.data.images.collate` takes it unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mlic.data.images import ImageError, read_image, sample_seed
from mlic.data.labelset import LabelSet, LabelSetError
from mlic.errors import MlicError
from mlic.io import atomic_file, atomic_write_bytes, folder_swap
from mlic.progress import progress_bar

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LABELS_DIR = "labels"
SPLITS = ("train", "val", "test")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ShardError(MlicError):
    """A shard folder or shard cannot be used; the message names it and what to do."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises as ShardError("Caught ShardError in DataLoader worker…\nOriginal
        # Traceback…\n…ShardError: <line>"): keep the one line the user needs, not the worker's traceback.
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


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


def encode_row(row: np.ndarray) -> dict[str, object]:
    """An int8 target row (K,) as compact JSON: its most common value and the class ids of the others.

    ``{"fill": 0, "1": [3, 17]}`` is a fully labelled row with two positives; ``{"fill": -1, "1": [5], "0": [9]}``
    a partial one. Rows of OpenImages (9,605 classes, ~8 known) take a few dozen bytes.
    """
    row = np.asarray(row, dtype=np.int8)
    values, counts = np.unique(row, return_counts=True)
    fill = int(values[np.argmax(counts)]) if row.size else -1
    code: dict[str, object] = {"fill": fill}
    for value in (1, 0, -1):
        if value != fill:
            ids = np.flatnonzero(row == value)
            if ids.size:
                code[str(value)] = ids.tolist()
    return code


def decode_row(code: dict, num_classes: int) -> np.ndarray:
    """The int8 row (K,) :func:`encode_row` encoded."""
    row = np.full(num_classes, int(code["fill"]), dtype=np.int8)
    for value in ("1", "0", "-1"):
        if value in code:
            row[np.asarray(code[value], dtype=np.int64)] = int(value)
    return row


def _image_bytes(labelset: LabelSet, i: int) -> tuple[bytes | None, str]:
    """The file's bytes and "", or None and why it cannot be packed (missing, unreadable, not an image)."""
    from PIL import Image, UnidentifiedImageError

    path = labelset.path(i)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "image not found"
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"
    try:  # the header only (~50 µs): catches empty and non-image files; a truncated body fails at training, counted
        Image.open(io.BytesIO(data)).close()
    except (UnidentifiedImageError, OSError) as e:
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
            # a tar member is a 512-byte header and its data padded to 512; an archive ends in two zero blocks
            size = sum(512 + -(-len(sample[name]) // 512) * 512 for name in (ext, "labels.json"))
            if writer is not None and shard_bytes + size + 1024 > shard_size_bytes:
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


@dataclass
class ShardIndex:
    """What a shard folder's index.json says, and where its shards are.

    Attributes:
        location: the folder, or a URL template with ``{shard}`` (``pipe:curl -s https://host/oi/train/{shard}``).
        shards: shard file names, in order.
        samples: samples per shard.
        classes: class names (K).
        split: "train", "val", "test", …
        num_rows: rows of the LabelSet the shards were written from (row indices lie in [0, num_rows)).
        observed: whether samples carry observed labels beside the clean ones.
        skipped: images not packed: {"index", "path", "reason"}.
        meta: the LabelSet's meta.
    """

    location: str
    shards: list[str]
    samples: list[int]
    classes: list[str]
    split: str = ""
    num_rows: int = 0
    observed: bool = False
    skipped: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @staticmethod
    def template(source: str | os.PathLike) -> str:
        """The URL template of ``source``: a local folder, a template with ``{shard}``, or a URL prefix."""
        text = str(source)
        if "{shard}" in text:
            return text
        if text.startswith("pipe:"):
            raise ShardError(f"{text}: a pipe: source needs {{shard}} where the file name goes, "
                             "e.g. 'pipe:curl -s https://host/oi/train/{shard}'")
        return text.rstrip("/") + "/{shard}"

    def url(self, shard: str) -> str:
        return self.location.replace("{shard}", shard)

    @property
    def num_samples(self) -> int:
        return int(sum(self.samples))

    @classmethod
    def read(cls, source: str | os.PathLike) -> ShardIndex:
        """Read index.json of a shard folder (or template / URL prefix, opened with webdataset's ``gopen``)."""
        from webdataset import gopen

        location = cls.template(source)
        url = location.replace("{shard}", INDEX_NAME)
        try:
            if "://" not in url and not url.startswith("pipe:"):
                text = Path(url).read_bytes()
            else:
                with gopen(url) as stream:
                    text = stream.read()
            header = json.loads(text)
        except FileNotFoundError:
            raise ShardError(f"{url}: not found; write the shards with 'mlic prepare shards' (index.json is "
                             "written last, so its absence also means an unfinished write)") from None
        except (OSError, ValueError) as e:
            raise ShardError(f"{url}: cannot read the shard index ({str(e).splitlines()[0][:120]}); "
                             "write the shards again with 'mlic prepare shards'") from None
        if header.get("format") != FORMAT_VERSION:
            raise ShardError(f"{url}: shard format {header.get('format')!r}, this mlic reads {FORMAT_VERSION}; "
                             "write the shards again with this version")
        try:
            index = cls(location=location, shards=list(header["shards"]), samples=[int(c) for c in header["samples"]],
                        classes=list(header["classes"]), split=header.get("split", ""),
                        num_rows=int(header.get("num_rows", 0)), observed=bool(header.get("observed")),
                        skipped=list(header.get("skipped", [])), meta=dict(header.get("meta", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{url}: malformed shard index ({type(e).__name__}: {e}); write the shards again") \
                from None
        if len(index.shards) != len(index.samples):
            raise ShardError(f"{url}: lists {len(index.shards)} shards but {len(index.samples)} sample counts; "
                             "write the shards again")
        return index

    def labelset(self) -> LabelSet:
        """The LabelSet beside the shards (``labels/``): classes, clean and observed targets; local folders only."""
        folder = Path(self.location.replace("{shard}", LABELS_DIR))
        if not (folder / "labelset.json").is_file():
            raise ShardError(f"{folder}: the labels beside the shards are not here; labels are read from a local "
                             "shard folder (copy its labels/ and index.json next to the job)")
        return LabelSet.load(folder)


def is_shards(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a shard folder (index.json) or holds split shard folders (train/index.json …)."""
    path = Path(path)
    return (path / INDEX_NAME).is_file() or any((path / s / INDEX_NAME).is_file() for s in SPLITS)


def open_data(path: str | os.PathLike) -> dict[str, ShardIndex]:
    """The shard folders under ``path`` as {split: ShardIndex}: ``path`` itself, or its train/ val/ test/.

    Raises:
        ShardError: no index.json at ``path`` or in its split folders, or the splits' classes differ.
    """
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        index = ShardIndex.read(path)
        return {index.split or "train": index}
    found = {s: ShardIndex.read(path / s) for s in SPLITS if (path / s / INDEX_NAME).is_file()}
    if not found:
        raise ShardError(f"{path}: no {INDEX_NAME} here or in train/ val/ test/; write shards with "
                         "'mlic prepare shards --data PREPARED --out SHARDS'")
    first = next(iter(found.values()))
    for split, index in found.items():
        if index.classes != first.classes:
            raise ShardError(f"{path}: {split}/ has other classes than {first.split}/; write the shards together")
    return found


def _distributed() -> tuple[int, int]:
    """(rank, world size) as :func:`mlic.engine.dist.world` reads them (torchrun's or srun's)."""
    from mlic.engine.dist import world

    return world()


class ShardDataset(IterableDataset):
    """Stream a shard folder as :class:`mlic.data.images.ImageDataset` rows.

    Yields ``(uint8 image (3, S, S) or None, int8 targets (K,), row index, error message or None)``; an image
    that cannot be decoded yields None and a message naming shard and image (``collate`` drops it, the
    trainer's :class:`BadImageCheck` counts it), exactly as the folder path does.

    Who reads what: every epoch the shard list is put in an order drawn from ``(seed, epoch)`` (natural order
    without ``shuffle``), rank r takes shards r, r + W, … of it (W = world size), and DataLoader worker w of that
    rank takes every ``num_workers``-th of those, from w. Every sample is read once per epoch across all ranks and
    workers. With fewer shards than ranks a rank would have nothing while the others train: refused (write
    smaller shards). With fewer shards than ranks × workers the workers past the rank's shard count read nothing
    and end at once; nothing is lost or repeated, only those workers idle — write at least ranks × workers
    shards to use them all. Ranks hold whole shards, so their sample counts differ by up to a shard's worth;
    :meth:`num_batches` gives each rank's batch count so a DDP loop can stop every rank after the same number.

    Inside a worker, samples pass a shuffle buffer of ``buffer`` encoded samples seeded by
    ``(seed, epoch, rank, worker)``: the order is the same on every run and changes with :meth:`set_epoch`
    (call it before iterating, as with DistributedSampler; resuming at epoch e is ``set_epoch(e)``). With
    ``shuffle`` each sample's transform also runs under its own torch seed (:meth:`sample_seed`, from seed,
    epoch and row), so its augmentation does not depend on how many ranks or workers read the shards.

    A damaged shard stops the epoch with a :class:`ShardError` naming the shard: unreadable or truncated tar,
    a sample without its labels or its image, or fewer samples than index.json lists. None of these is
    skipped: each means the shard was not written completely, and skipping would leave this rank with fewer
    samples than index.json promises, so DDP ranks would disagree on the epoch's length. Write the shards
    again (or restore the file).

    Args:
        source: a shard folder, a URL template with ``{shard}`` or a URL prefix (see :class:`ShardIndex`).
        transform: as for ImageDataset, e.g. :func:`mlic.data.images.build_transform`.
        targets: "train" (observed labels when the shards have them, else clean; ImageDataset's default) or
            "clean" (what evaluation uses).
        shuffle: shuffle shard order and samples (training); off reads shards and samples in order.
        buffer: shuffle buffer size in samples (encoded bytes each: 1,000 OpenImages JPEGs ≈ 200 MB per worker).
        seed: seed of shard order and shuffle buffer.
        rank, world_size: this process's place; default torch.distributed's, else RANK / WORLD_SIZE, else (0, 1).
        decode_size: as for ImageDataset (default the transform's ``decode_size``).
        idle_ranks: allow fewer shards than ranks (scoring, where each rank's part is gathered and a rank may
            have none); training refuses it, as its ranks must step together.
        read: as for ImageDataset (default :func:`mlic.data.images.read_image`).
    """

    def __init__(self, source: str | os.PathLike | ShardIndex, transform, targets: str = "train",
                 shuffle: bool = True, buffer: int = 1000, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, decode_size: int | None = None, idle_ranks: bool = False,
                 read=None) -> None:
        if targets not in ("train", "clean"):
            raise ValueError(f"targets must be 'train' or 'clean', got {targets!r}")
        self.index = source if isinstance(source, ShardIndex) else ShardIndex.read(source)
        self.transform, self.targets, self.shuffle = transform, targets, shuffle
        self.buffer, self.seed, self.decode_size = max(1, int(buffer)), int(seed), decode_size
        self.read = read or read_image
        found_rank, found_world = _distributed()
        self.rank = found_rank if rank is None else int(rank)
        self.world_size = found_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ShardError(f"rank {self.rank} is not in [0, {self.world_size}); check RANK and WORLD_SIZE")
        if len(self.index.shards) < self.world_size and not idle_ranks:
            raise ShardError(f"{self.index.location}: {len(self.index.shards)} shards for {self.world_size} ranks; "
                             "every rank needs at least one: write smaller shards (mlic prepare shards --shard-size)")
        # shared with DataLoader workers (persistent ones too), so set_epoch in the main process reaches them
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    def set_epoch(self, epoch: int) -> None:
        """Shard order and shuffle buffer of ``epoch`` (0-based); call before iterating."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def shards_for(self, rank: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Positions in ``index.shards`` that ``worker`` of ``rank`` reads this epoch, in reading order."""
        order = list(range(len(self.index.shards)))
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{self.epoch}").shuffle(order)
        return order[rank::self.world_size][worker::max(1, num_workers)]

    def __len__(self) -> int:
        """Samples this rank reads this epoch (all its workers together)."""
        return sum(self.index.samples[s] for s in self.shards_for(self.rank))

    def num_batches(self, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                    rank: int | None = None) -> int:
        """Batches a DataLoader over this dataset gives ``rank`` (default this one) this epoch.

        Each worker batches its own shards, so every worker may end in a partial batch. A DDP loop runs
        ``min(num_batches(..., rank=r) for r in range(world_size))`` steps so that every rank steps together.
        """
        rank = self.rank if rank is None else rank
        total = 0
        for w in range(max(1, num_workers)):
            count = sum(self.index.samples[s] for s in self.shards_for(rank, w, num_workers))
            total += count // batch_size if drop_last else -(-count // batch_size)
        return total

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, int, str | None]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.shards_for(self.rank, worker, num_workers)
        samples = (s for shard in shards for s in self._read_shard(shard))
        if self.shuffle:
            samples = _shuffled(samples, self.buffer,
                                random.Random(f"buffer-{self.seed}-{self.epoch}-{self.rank}-{worker}"))
        key = "observed" if self.targets == "train" and self.index.observed else "targets"
        k = self.num_classes
        for name, data, entry in samples:
            row = int(entry["index"])
            target = torch.from_numpy(decode_row(entry[key], k))
            try:
                if not self.shuffle:
                    image = self.read(name, self.transform, self.decode_size, data=data)
                else:  # augmentation draws depend on (seed, epoch, row) alone: not on rank, worker or buffer order
                    with torch.random.fork_rng(devices=[]):
                        # the CPU generator only: torch.manual_seed also queues a lazy CUDA seeding that formats
                        # the call stack each time (~0.5 ms a sample, measured); the draws are the same
                        torch.default_generator.manual_seed(self.sample_seed(row))
                        image = self.read(name, self.transform, self.decode_size, data=data)
            except ImageError as e:
                yield None, target, row, str(e)
                continue
            yield image, target, row, None

    def sample_seed(self, row: int) -> int:
        """The torch seed of row ``row``'s transform this epoch (with ``shuffle``): ``ImageDataset[(row, seed)]``
        gives the same pixels."""
        return sample_seed(self.seed, self.epoch, row)

    def _read_shard(self, position: int) -> Iterator[tuple[str, bytes, dict]]:
        """(name for messages, image bytes, labels entry) of each sample of one shard, checked against index.json."""
        from webdataset import gopen

        shard = self.index.shards[position]
        url = self.index.url(shard)
        expected = self.index.samples[position]
        fix = "write the shards again with 'mlic prepare shards' (or restore the file)"
        count = 0
        try:
            stream = gopen(url)
        except OSError as e:
            raise ShardError(f"{url}: cannot open shard ({e.strerror or e}); check the path or URL, or {fix}") \
                from None
        try:
            for key, files in _grouped(_tar_members(stream)):
                labels = files.pop("labels.json", None)
                if labels is None:
                    raise ShardError(f"{url}: sample {key} has no labels entry ({key}.labels.json); the shard is "
                                     f"damaged or not written by mlic: {fix}")
                if len(files) != 1:
                    raise ShardError(f"{url}: sample {key} has {len(files)} image entries, expected 1; {fix}")
                (ext, data), = files.items()
                entry = json.loads(labels)
                yield f"{shard}:{entry.get('path', key + '.' + ext)}", data, entry
                count += 1
        except ShardError:
            raise
        except (_TarError, ValueError, OSError) as e:  # ValueError: an unparsable header field or labels entry
            reason = str(e).splitlines()[0][:120] or type(e).__name__
            raise ShardError(f"{url}: truncated or corrupt after {count} of {expected} samples ({reason}); "
                             f"{fix}") from None
        finally:
            with contextlib.suppress(Exception):  # a failed pipe: command reports here; the reading error says more
                stream.close()
        if count != expected:
            raise ShardError(f"{url}: holds {count} samples but index.json lists {expected} (truncated?); {fix}")


class _TarError(Exception):
    """A tar stream ends early or holds a damaged header."""


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream, read sequentially.

    A small reader instead of ``tarfile``: parsing a header in Python's tarfile costs ~0.1 ms, as much as
    decoding a 64 px PNG. It reads ustar/GNU/pax tars as webdataset and tar write them: regular files,
    directories (skipped), pax ``path``/``size`` records and GNU long names; headers are checksummed.
    """
    long_name, pax = None, {}
    while True:
        header = stream.read(512)
        if len(header) < 512:
            raise _TarError("unexpected end of data" if header else "no end-of-archive marker")
        if header == bytes(512):  # end of archive
            return
        stored = header[148:156].strip(b"\0 ")
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise _TarError("bad header checksum")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else int(header[124:136].strip(b"\0 ") or b"0", 8)
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        data = stream.read(size)
        if len(data) < size:
            raise _TarError("unexpected end of data")
        if size % 512 and len(stream.read(512 - size % 512)) < 512 - size % 512:
            raise _TarError("unexpected end of data")
        if kind == b"x":  # pax extended header: "<len> <key>=<value>\n" records for the next member
            for record in data.decode("utf-8", "replace").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key in ("path", "size"):
                    pax[key] = value
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0]
            continue
        if kind in (b"0", b"\0"):
            yield (pax.get("path") or (long_name or name).decode("utf-8", "replace")), data
        long_name, pax = None, {}


def _grouped(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members with the same key (the name up to its first dot) as (key, {extension: bytes})."""
    key, files = None, {}
    for name, data in members:
        stem, dot, ext = name.partition(".")
        if stem != key:
            if key is not None:
                yield key, files
            key, files = stem, {}
        files[ext if dot else ""] = data
    if key is not None:
        yield key, files


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """``items`` through a shuffle buffer of ``size``: each out-going item is a uniform pick of the buffer."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf
