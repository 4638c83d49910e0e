"""Streaming shards: :class:`ShardDataset` reads a shard folder back as ImageDataset rows, each rank and
DataLoader worker its own shards, through a seeded shuffle buffer, epoch by epoch."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mlic.data.images import ImageError, read_image, sample_seed
from mlic.data.shards.index import ShardError, ShardIndex
from mlic.data.shards.row_code import decode_row
from mlic.data.shards.tar import TarError, grouped_members, tar_members


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
            for key, files in grouped_members(tar_members(stream)):
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
        except (TarError, ValueError, OSError) as e:  # ValueError: an unparsable header field or labels entry
            reason = str(e).splitlines()[0][:120] or type(e).__name__
            raise ShardError(f"{url}: truncated or corrupt after {count} of {expected} samples ({reason}); "
                             f"{fix}") from None
        finally:
            with contextlib.suppress(Exception):  # a failed pipe: command reports here; the reading error says more
                stream.close()
        if count != expected:
            raise ShardError(f"{url}: holds {count} samples but index.json lists {expected} (truncated?); {fix}")


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
