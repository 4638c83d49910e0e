"""Read CUB-200-2011's 312 binary attributes as multi-label targets, as Cole et al. (2021) use them.

Layout (the ``CUB_200_2011`` folder of the official archive)::

    images.txt                               <image_id> <class folder>/<file>.jpg
    train_test_split.txt                     <image_id> <is_training_image 1|0>
    attributes/image_attribute_labels.txt    <image_id> <attribute_id> <is_present> <certainty_id> <time>
    attributes.txt                           <attribute_id> <name>   (beside the folder in the archive,
                                             or under attributes/ in some copies)
    images/<class folder>/<file>.jpg

Cole et al.'s ``preproc/format_cub.py`` takes ``is_present`` as the label and ignores the certainty
(1 not visible, 2 guessing, 3 probably, 4 definitely); images with ``is_training_image`` 1 form
the train split, the others the test split, both in ``images.txt`` order. That is the default here;
``min_certainty`` (2..4) turns entries marked less certain into -1 (unknown) instead.
A few lines of the attribute file carry an extra field; only the first four fields are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlic.data.labelset import LabelSet, LabelSetError
from mlic.data.table import read_lines
from mlic.errors import MlicError
from mlic.registry import register_reader


@register_reader("cub")
def read_cub(root: str | os.PathLike, min_certainty: int = 1) -> dict[str, LabelSet]:
    """Read CUB-200-2011 attribute labels.

    Args:
        root: the ``CUB_200_2011`` folder (holding ``images.txt``), or its parent.
        min_certainty: certainty id below which an entry becomes unknown (-1); 1 keeps every entry
            (Cole et al.).

    Returns:
        {"train": LabelSet, "test": LabelSet}, targets int8 (N, 312), image paths ``images/...``.

    Raises:
        LabelSetError: a file is missing or malformed (file, line and field named), or an image lacks
            some attribute.
    """
    if not 1 <= min_certainty <= 4:
        raise MlicError(f"min_certainty must be 1..4, got {min_certainty}")
    root = Path(root)
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    image_ids, files = _id_table(root / "images.txt", "path")
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    split_ids, flags = _id_table(root / "train_test_split.txt", "is_training_image")
    is_train = np.zeros(len(image_ids), dtype=bool)
    for number, (image_id, flag) in enumerate(zip(split_ids, flags), start=1):
        if image_id not in row_of or flag not in ("0", "1"):
            field = "image_id" if image_id not in row_of else "is_training_image"
            raise LabelSetError(f"{root / 'train_test_split.txt'}: line {number}: field '{field}' is invalid")
        is_train[row_of[image_id]] = flag == "1"
    if len(split_ids) != len(image_ids):
        raise LabelSetError(f"{root / 'train_test_split.txt'}: {len(split_ids)} rows, images.txt has {len(image_ids)}")
    names = _attribute_names(root)
    targets = _attribute_labels(root / "attributes" / "image_attribute_labels.txt", row_of, len(names), min_certainty)
    meta = {"source": "cub", "min_certainty": min_certainty}
    paths = [f"images/{f}" for f in files]
    sets = {}
    for split, mask in (("train", is_train), ("test", ~is_train)):
        rows = np.flatnonzero(mask)
        sets[split] = LabelSet(names, [paths[i] for i in rows], targets[rows], root=str(root), split=split,
                               meta=dict(meta))
    return sets


def _id_table(path: Path, field: str) -> tuple[list[int], list[str]]:
    """Two-column ``<id> <value>`` file -> ids, values."""
    ids: list[int] = []
    values: list[str] = []
    seen: set[int] = set()
    for number, line in enumerate(read_lines(path, "expected the CUB_200_2011 folder"), start=1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise LabelSetError(f"{path}: line {number}: expected '<id> <{field}>', got '{line.strip()}'")
        image_id = int(parts[0])
        if image_id in seen:
            raise LabelSetError(f"{path}: line {number}: id {image_id} appears twice")
        seen.add(image_id)
        ids.append(image_id)
        values.append(parts[1].strip())
    return ids, values


def _attribute_names(root: Path) -> list[str]:
    for path in (root.parent / "attributes.txt", root / "attributes.txt", root / "attributes" / "attributes.txt"):
        if path.is_file():
            ids, names = _id_table(path, "attribute name")
            if ids != list(range(1, len(ids) + 1)):
                raise LabelSetError(f"{path}: attribute ids must run 1, 2, ... in order")
            return names
    raise LabelSetError(f"{root.parent / 'attributes.txt'}: not found (also looked in {root} and "
                        f"{root / 'attributes'}); it comes with the CUB_200_2011 archive")


def _attribute_labels(path: Path, row_of: dict[int, int], num_attributes: int, min_certainty: int) -> np.ndarray:
    if not path.is_file():
        raise LabelSetError(f"{path}: not found; expected CUB_200_2011/attributes/image_attribute_labels.txt")
    try:  # numpy's C parser: 3.7 million lines in seconds, extra trailing fields ignored
        table = np.loadtxt(path, usecols=(0, 1, 2, 3), dtype=np.int64, ndmin=2)
    except ValueError as e:
        fields = "<image_id> <attribute_id> <is_present> <certainty_id>"
        raise LabelSetError(f"{path}: expected {fields} on every line; {e}") from None
    image_ids, attribute_ids, is_present, certainty = table.T
    known = np.array(sorted(row_of), dtype=np.int64)
    position = np.minimum(np.searchsorted(known, image_ids), max(len(known) - 1, 0))
    checks = (
        ("image_id", known[position] == image_ids if len(known) else np.zeros(len(table), bool)),
        ("attribute_id", (attribute_ids >= 1) & (attribute_ids <= num_attributes)),
        ("is_present", (is_present == 0) | (is_present == 1)),
        ("certainty_id", (certainty >= 1) & (certainty <= 4)),
    )
    for name, ok in checks:
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise LabelSetError(f"{path}: row {k + 1}: field '{name}' is invalid ({' '.join(map(str, table[k]))})")
    rows = np.array([row_of[i] for i in known], dtype=np.int64)[position]
    cell = rows * num_attributes + attribute_ids - 1
    counts = np.bincount(cell, minlength=len(row_of) * num_attributes)
    if (counts != 1).any():
        c = int(np.flatnonzero(counts != 1)[0])
        image_id = next(i for i, r in row_of.items() if r == c // num_attributes)
        what = "has no line" if counts[c] == 0 else f"has {counts[c]} lines"
        raise LabelSetError(f"{path}: image {image_id} {what} for attribute {c % num_attributes + 1}; "
                            f"every image needs exactly one per attribute")
    targets = np.where(certainty >= min_certainty, is_present, -1).astype(np.int8)
    out = np.empty(len(row_of) * num_attributes, dtype=np.int8)
    out[cell] = targets
    return out.reshape(len(row_of), num_attributes)
