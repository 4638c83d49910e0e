"""Read OpenImages (V6 / V7) human-verified image-level labels into sparse LabelSets.

Layout under ``root``, as downloaded from the official site (V7 names ``oidv7-…`` accepted too)::

    oidv6-class-descriptions.csv                        LabelName,DisplayName (header optional)
    oidv6-train-annotations-human-imagelabels.csv       ImageID,Source,LabelName,Confidence
    validation-annotations-human-imagelabels.csv        (V7: oidv7-val-annotations-human-imagelabels.csv)
    test-annotations-human-imagelabels.csv              (V7: oidv7-test-annotations-human-imagelabels.csv)
    train/<ImageID>.jpg, validation/<ImageID>.jpg, test/<ImageID>.jpg

Confidence 1 is a positive, 0 a negative; a class not listed for an image is unknown (-1). An
image appears in a split when it has at least one human-verified label there. Targets are
:class:`~mlic.data.targets.SparseTargets`: 9M images with ~8 known labels each take ~0.4 GB.

Streaming: a label file is read in blocks of :data:`BLOCK_BYTES` and each block is parsed with
C-level byte splitting; memory is bounded by the block plus the output (5 bytes per known label,
8 per image, and the image ids). This relies on the official files' order: rows grouped by
ImageID in ascending byte order. A file in another order is refused with the command that sorts it.

Bad input: a LabelName missing from the class descriptions, a Confidence other than 0 / 1, two
rows giving one (image, class) different values, a row with the wrong number of fields: each
stops the read with ``file: line N: …`` and what to do. Rows repeated with the same value, and
rows of classes left out by a ``trainable`` list, are skipped and counted in ``meta``.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mlic.data.labelset import ImagePaths, LabelSet, LabelSetError
from mlic.data.targets import SparseTargets
from mlic.progress import progress_bar
from mlic.registry import register_reader

BLOCK_BYTES = 8 << 20
CLASS_FILES = ("oidv7-class-descriptions.csv", "oidv6-class-descriptions.csv", "class-descriptions.csv")
LABEL_FILES = {
    "train": ("oidv7-train-annotations-human-imagelabels.csv", "oidv6-train-annotations-human-imagelabels.csv",
              "train-annotations-human-imagelabels.csv"),
    "val": ("oidv7-val-annotations-human-imagelabels.csv", "validation-annotations-human-imagelabels.csv"),
    "test": ("oidv7-test-annotations-human-imagelabels.csv", "test-annotations-human-imagelabels.csv"),
}
IMAGE_FOLDERS = {"train": "train", "val": "validation", "test": "test"}
_CONFIDENCE = {b"1": 1, b"0": 0, b"1.0": 1, b"0.0": 0}
_UNKNOWN, _EXCLUDED = -1, -2


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / name for name in names if (root / name).is_file()), None)


def read_classes(root: str | os.PathLike, trainable: str | os.PathLike | None = None
                 ) -> tuple[list[str], list[str], dict[bytes, int]]:
    """Class names and ids from the class descriptions, optionally restricted to a trainable list.

    Args:
        root: OpenImages folder holding ``oidv6-class-descriptions.csv`` (or the V7 name).
        trainable: optional text file with one LabelName per line (e.g. ``oidv6-classes-trainable.txt``,
            ML-Decoder's 9,605 classes); classes come in its order. Default: every described class.

    Returns:
        (names, label_names, lookup): K DisplayNames (a name shared by several classes gets
        `` (LabelName)`` appended), the K LabelNames, and LabelName bytes -> class id (-2 for a
        described class left out by ``trainable``).
    """
    root = Path(root)
    path = _find(root, CLASS_FILES)
    if path is None:
        raise LabelSetError(f"{root}: no {CLASS_FILES[1]} (or {CLASS_FILES[0]}); download the class descriptions "
                            f"of the same release into this folder")
    display: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or (line_no == 1 and row[:2] == ["LabelName", "DisplayName"]):
                continue
            if len(row) != 2:
                raise LabelSetError(f"{path}: line {line_no}: expected LabelName,DisplayName, got {len(row)} fields")
            if row[0] in display:
                raise LabelSetError(f"{path}: line {line_no}: LabelName {row[0]} described twice; use the official "
                                    f"file")
            display[row[0]] = row[1]
    labels = list(display)
    if trainable is not None:
        trainable = Path(trainable)
        if not trainable.is_file():
            raise LabelSetError(f"{trainable}: trainable class list not found; pass a file of LabelNames, one a line")
        labels = []
        for line_no, line in enumerate(trainable.read_text(encoding="utf-8").splitlines(), start=1):
            label = line.split(",")[0].strip()
            if not label:
                continue
            if label not in display:
                raise LabelSetError(f"{trainable}: line {line_no}: LabelName {label} is not in {path.name}; use the "
                                    f"class descriptions of the same release")
            labels.append(label)
        if len(set(labels)) != len(labels):
            raise LabelSetError(f"{trainable}: a LabelName is listed twice; list each class once")
    lookup = dict.fromkeys((label.encode() for label in display), _EXCLUDED)
    lookup.update((label.encode(), k) for k, label in enumerate(labels))
    shown = [display[label] for label in labels]
    shared = {name for name in shown if shown.count(name) > 1} if len(set(shown)) != len(shown) else set()
    names = [f"{name} ({label})" if name in shared else name for name, label in zip(shown, labels)]
    return names, labels, lookup


def read_image_labels(path: str | os.PathLike, lookup: dict[bytes, int], num_classes: int,
                      progress: bool = False) -> tuple[np.ndarray, SparseTargets, dict[str, int]]:
    """Stream one ``*-annotations-human-imagelabels.csv`` into sparse targets.

    Args:
        path: the label file (header ``ImageID,Source,LabelName,Confidence``, rows grouped by ImageID, ascending).
        lookup: LabelName bytes -> class id, from :func:`read_classes`.
        num_classes: K.
        progress: show a progress bar over the file's bytes.

    Returns:
        (image ids as a bytes array (N,), targets (N, K) with class ids ascending in each row,
        counts ``{"rows", "duplicates", "skipped_untrainable"}``). The index arrays are memory-mapped
        from unlinked temporary files: no RAM is held for them, and the disk space returns when they are freed.
    """
    path = Path(path)
    work = Path(tempfile.mkdtemp(prefix="mlic-openimages-"))
    try:
        with open(path, "rb") as f, open(work / "indices", "wb") as out_indices, \
                open(work / "values", "wb") as out_values:
            reader = _LabelReader(path, f, lookup, num_classes, out_indices, out_values)
            reader.run(progress)
        indices = _map_raw(work / "indices", np.int32)
        values = _map_raw(work / "values", np.int8)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the open maps keep the data until they are released
    counts = np.concatenate(reader.image_counts) if reader.image_counts else np.zeros(0, np.int64)
    indptr = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    ids = np.concatenate(reader.image_ids) if reader.image_ids else np.zeros(0, "S1")
    stats = {"rows": reader.rows, "duplicates": reader.duplicates, "skipped_untrainable": reader.untrainable}
    return ids, SparseTargets(indptr, indices, values, num_classes), stats


def _map_raw(path: Path, dtype) -> np.ndarray:
    size = path.stat().st_size // np.dtype(dtype).itemsize
    return np.memmap(path, dtype=dtype, mode="r", shape=(size,)) if size else np.zeros(0, dtype)


class _LabelReader:
    """One pass over a label file, block by block; appends each finished block of images to the outputs."""

    def __init__(self, path: Path, f, lookup: dict[bytes, int], num_classes: int, out_indices, out_values) -> None:
        self.path, self.f, self.lookup, self.num_classes = path, f, lookup, num_classes
        self.out_indices, self.out_values = out_indices, out_values
        self.image_ids: list[np.ndarray] = []
        self.image_counts: list[np.ndarray] = []
        self.last_id = b""
        self.rows = self.duplicates = self.untrainable = 0
        self.line = 1  # lines consumed so far (the header is line 1)

    def run(self, progress: bool) -> None:
        header = self.f.readline().removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n").split(b",")  # BOM: Excel
        try:
            self.columns = [header.index(name) for name in (b"ImageID", b"LabelName", b"Confidence")]
        except ValueError:
            raise LabelSetError(f"{self.path}: line 1 must be the header ImageID,Source,LabelName,Confidence; "
                                f"got {b','.join(header).decode(errors='replace')[:80]!r}") from None
        self.num_fields = len(header)
        size = self.path.stat().st_size
        bar = progress_bar(size, f"reading {self.path.name}", enabled=progress and size >= BLOCK_BYTES, unit="bytes")
        carry = b""
        try:
            while True:
                block = self.f.read(BLOCK_BYTES)
                bar.advance(count=len(block))
                data = carry + block
                if not block:
                    if data.strip():
                        self._parse(data if data.endswith(b"\n") else data + b"\n", final=True)
                    return
                cut = data.rfind(b"\n") + 1
                carry = data[cut:]
                if cut:
                    carry = self._parse(data[:cut], final=False) + carry
        finally:
            bar.close()

    def _fail(self, row: int, message: str) -> None:
        raise LabelSetError(f"{self.path}: line {self.line + row + 1}: {message}")

    def _parse(self, data: bytes, final: bool) -> bytes:
        """Parse whole lines; returns the lines of the block's last image (unless ``final``) to be read again."""
        data = data.replace(b"\r", b"")
        raw = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(raw == ord("\n"))
        fields = np.diff(np.searchsorted(np.flatnonzero(raw == ord(",")), ends), prepend=0) + 1
        if (fields != self.num_fields).any():
            row = int(np.flatnonzero(fields != self.num_fields)[0])
            self._fail(row, f"expected {self.num_fields} comma-separated fields (ImageID,Source,LabelName,"
                            f"Confidence), found {fields[row]}; fix or remove the line")
        parts = data[:-1].replace(b"\n", b",").split(b",")  # data ends with a newline
        id_col, label_col, conf_col = self.columns
        ids = np.array(parts[id_col::self.num_fields])
        new = np.empty(ids.size, bool)
        new[0] = ids[0] != self.last_id
        np.not_equal(ids[1:], ids[:-1], out=new[1:])
        backwards = np.flatnonzero(np.concatenate([[ids[0] < self.last_id], ids[1:] < ids[:-1]]))
        if backwards.size:
            row = int(backwards[0])
            before = ids[row - 1] if row else self.last_id
            self._fail(row, f"ImageID {ids[row].decode()} after {before.decode()}: rows must be grouped by ImageID in "
                            f"ascending order, as in the official files; sort them: (head -n1 F; tail -n +2 F | "
                            f"LC_ALL=C sort) > F.sorted")
        starts = np.flatnonzero(new)
        if not final:
            if starts.size == 0 or starts[-1] == 0:  # one image fills the block: read on
                return data
            keep = int(starts[-1])  # the last image may continue in the next block
            held = data[int(ends[keep - 1]) + 1:]
            ids, new, starts = ids[:keep], new[:keep], starts[:-1]
        else:
            keep, held = ids.size, b""
        labels = parts[label_col::self.num_fields][:keep]
        classes = np.fromiter((self.lookup.get(x, _UNKNOWN) for x in labels), np.int32, count=keep)
        if (classes == _UNKNOWN).any():
            row = int(np.flatnonzero(classes == _UNKNOWN)[0])
            self._fail(row, f"LabelName {labels[row].decode()} is not in the class descriptions; use the class "
                            f"descriptions file of the same release")
        values = np.fromiter((_CONFIDENCE.get(x, -1) for x in parts[conf_col::self.num_fields][:keep]), np.int8,
                             count=keep)
        if (values < 0).any():
            row = int(np.flatnonzero(values < 0)[0])
            self._fail(row, f"Confidence {parts[conf_col::self.num_fields][row].decode()!r} is neither 0 nor 1; "
                            f"read the human-verified file (*-human-imagelabels.csv), not machine labels")
        image = np.cumsum(new) - 1  # the first row never continues an image: held lines start every block
        rows = np.arange(keep)
        trainable = classes >= 0
        self.untrainable += int((~trainable).sum())
        image, classes, values, rows = image[trainable], classes[trainable], values[trainable], rows[trainable]
        order = np.argsort(image * self.num_classes + classes, kind="stable")
        image, classes, values, rows = image[order], classes[order], values[order], rows[order]
        repeat = np.flatnonzero((image[1:] == image[:-1]) & (classes[1:] == classes[:-1])) + 1
        clash = repeat[values[repeat] != values[repeat - 1]]
        if clash.size:
            first, second = sorted((int(rows[clash[0] - 1]), int(rows[clash[0]])))
            self._fail(second, f"image {ids[first].decode()} class {labels[first].decode()}: Confidence differs "
                               f"from line {self.line + first + 1}; keep one of the two rows")
        unique = np.ones(image.size, bool)
        unique[repeat] = False
        self.duplicates += int(repeat.size)
        self.out_indices.write(classes[unique].astype(np.int32).tobytes())
        self.out_values.write(values[unique].tobytes())
        self.image_ids.append(ids[starts])
        self.image_counts.append(np.bincount(image[unique], minlength=starts.size).astype(np.int64))
        self.rows += keep
        self.line += keep
        self.last_id = ids[keep - 1]
        return held


@register_reader("openimages")
def read_openimages(root: str | os.PathLike, trainable: str | os.PathLike | None = None, drop_missing: bool = False,
                    progress: bool = True) -> dict[str, LabelSet]:
    """Read every split present into sparse LabelSets: train (required), val (from validation), test.

    Args:
        root: OpenImages folder (see the module docstring).
        trainable: optional file of LabelNames, one a line, restricting and ordering the classes.
        drop_missing: drop images whose file ``<folder>/<ImageID>.jpg`` is absent (counted either way).
        progress: progress bars while reading the label files.

    Returns:
        {split: LabelSet}; ``meta`` holds ``label_names`` (K LabelNames beside the class names),
        ``rows``, ``duplicates``, ``skipped_untrainable``, ``missing_images``, ``dropped_missing``.
    """
    root = Path(root)
    if _find(root, LABEL_FILES["train"]) is None:
        raise LabelSetError(f"{root}: no {LABEL_FILES['train'][1]} (or {LABEL_FILES['train'][0]}); download the "
                            f"human-verified image labels into this folder")
    names, label_names, lookup = read_classes(root, trainable)
    sets = {}
    for split, files in LABEL_FILES.items():
        path = _find(root, files)
        if path is None:
            continue
        ids, targets, counts = read_image_labels(path, lookup, len(names), progress)
        folder = IMAGE_FOLDERS[split]
        paths = ImagePaths(np.char.add(np.char.add(f"{folder}/".encode(), ids), b".jpg"))
        if (root / folder).is_dir():
            missing = np.fromiter((not os.path.isfile(root / p) for p in paths), bool, count=len(paths))
        else:
            missing = np.ones(len(paths), bool)
        meta = {"source": "openimages", "labels_file": path.name, "label_names": label_names, **counts,
                "missing_images": int(missing.sum()), "dropped_missing": 0}
        if drop_missing and missing.any():
            kept = np.flatnonzero(~missing)
            targets, paths = targets.take(kept), paths.take(kept)
            meta["dropped_missing"] = int(missing.sum())
        sets[split] = LabelSet(names, paths, targets, root=str(root), split=split, meta=meta)
    return sets
