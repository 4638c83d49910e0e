"""The shard index: a shard folder's ``index.json`` (:class:`ShardIndex`), read and checked, and finding shard folders.

``index.json`` is ``{"format", "split", "classes", "num_rows", "shards": [names], "samples": [count per shard],
"observed", "skipped": [{"index", "path", "reason"}], "meta"}``, written last; ``labels/`` beside it holds the
LabelSet the shards were written from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlic.data.labelset import LabelSet
from mlic.errors import MlicError

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LABELS_DIR = "labels"
SPLITS = ("train", "val", "test")


class ShardError(MlicError):
    """A shard folder or shard cannot be used; the message names it and what to do."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises as ShardError("Caught ShardError in DataLoader worker…\nOriginal
        # Traceback…\n…ShardError: <line>"): keep the one line the user needs, not the worker's traceback.
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


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
