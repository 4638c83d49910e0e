"""Read Pascal VOC 2007/2012 classification labels into LabelSets.

The VOC folder (``VOCdevkit/VOC2007``) holds ``Annotations/<id>.xml``, ``ImageSets/Main/<split>.txt``
(one image id per line), ``ImageSets/Main/<class>_<split>.txt`` (``<id> 1`` present, ``<id> -1``
absent, ``<id> 0`` present only as "difficult" objects) and ``JPEGImages/<id>.jpg``.

Two sources give the same labels:

- ``source="xml"``: the image list plus each image's XML; a class is positive when the image has a
  non-difficult object of it, "difficult" when it has only difficult ones, negative otherwise.
- ``source="lists"``: the 20 per-class lists.

"Difficult" becomes -1 (unknown) by default, the VOC evaluation rule; ``difficult="positive"`` or
``"negative"`` decides it instead.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import numpy as np

from mlic.data.labelset import LabelSet, LabelSetError
from mlic.data.table import read_lines
from mlic.errors import MlicError
from mlic.registry import register_reader

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
DIFFICULT = {"unknown": -1, "positive": 1, "negative": 0}
SOURCES = ("xml", "lists")


def find_voc(root: str | os.PathLike, year: str | None = None) -> Path:
    """The VOC year folder under ``root``: ``root`` itself, ``root/VOC<year>`` or ``root/VOCdevkit/VOC<year>``."""
    root = Path(root)
    candidates = [root]
    years = [year] if year else ["2007", "2012"]
    for y in years:
        candidates += [root / f"VOC{y}", root / "VOCdevkit" / f"VOC{y}"]
    for folder in candidates:
        if (folder / "ImageSets" / "Main").is_dir():
            return folder
    raise LabelSetError(f"{root}: no VOC folder found (looked for ImageSets/Main under {root}, VOC<year>/, "
                        f"VOCdevkit/VOC<year>/); point --root at VOCdevkit/VOC2007 or similar")


def read_voc(root: str | os.PathLike, split: str, source: str = "xml", difficult: str = "unknown",
             year: str | None = None) -> LabelSet:
    """Read one VOC split ("train", "val", "trainval", "test").

    Args:
        root: the VOC year folder, or a folder holding ``VOCdevkit/VOC<year>``.
        split: image set name in ``ImageSets/Main``.
        source: "xml" (Annotations) or "lists" (per-class ImageSets lists).
        difficult: what an image whose only objects of a class are difficult gets: "unknown" (-1),
            "positive" (1) or "negative" (0).
        year: "2007" or "2012" when ``root`` holds several.

    Returns:
        LabelSet over the 20 classes in the standard order, rows in the order of ``<split>.txt``
        (``source="lists"`` without that file: the order of the first class list), image paths
        ``JPEGImages/<id>.jpg`` under the VOC folder.

    Raises:
        LabelSetError: a list or XML file is missing or malformed (file, line or field named).
    """
    if source not in SOURCES:
        raise MlicError(f"unknown VOC source '{source}'; choose one of {SOURCES}")
    if difficult not in DIFFICULT:
        raise MlicError(f"unknown difficult policy '{difficult}'; choose one of {tuple(DIFFICULT)}")
    folder = find_voc(root, year)
    main = folder / "ImageSets" / "Main"
    if source == "xml":
        ids = _read_ids(main / f"{split}.txt")
        targets = np.stack([_labels_from_xml(folder / "Annotations" / f"{i}.xml", DIFFICULT[difficult]) for i in ids]) \
            if ids else np.zeros((0, len(VOC_CLASSES)), np.int8)
    else:
        ids, targets = _labels_from_lists(main, split, DIFFICULT[difficult])
    meta = {"source": "voc", "folder": str(folder), "label_source": source, "difficult": difficult}
    return LabelSet(list(VOC_CLASSES), [f"JPEGImages/{i}.jpg" for i in ids], targets, root=str(folder),
                    split=split, meta=meta)


@register_reader("voc")
def prepare_voc(root: Path, year: str | None = None, splits: tuple[str, str] | None = None,
                source: Literal["xml", "lists"] = "xml",
                difficult: Literal["unknown", "positive", "negative"] = "unknown") -> dict[str, LabelSet]:
    """``mlic prepare voc``: train and test (trainval/test, when test.txt exists) or train and val (train/val)."""
    folder = find_voc(root, year)
    if splits is None:
        splits = ("trainval", "test") if (folder / "ImageSets" / "Main" / "test.txt").is_file() else ("train", "val")
    train, held_out = splits
    return {
        "train": read_voc(folder, train, source=source, difficult=difficult),
        "test" if held_out == "test" else "val": read_voc(folder, held_out, source=source, difficult=difficult),
    }


def _read_ids(path: Path) -> list[str]:
    ids = [line.split()[0] for line in read_lines(path, "expected a VOC ImageSets/Main image list") if line.strip()]
    seen: set[str] = set()
    for number, image_id in enumerate(ids, start=1):
        if image_id in seen:
            raise LabelSetError(f"{path}: line {number}: image id '{image_id}' listed twice")
        seen.add(image_id)
    return ids


def _labels_from_xml(path: Path, difficult_value: int) -> np.ndarray:
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise LabelSetError(f"{path}: not found; the image is listed in ImageSets but has no annotation") from None
    except ET.ParseError as e:
        line, column = e.position
        raise LabelSetError(f"{path}: not valid XML (line {line} column {column})") from None
    column_of = {name: j for j, name in enumerate(VOC_CLASSES)}
    plain = np.zeros(len(VOC_CLASSES), bool)
    hard = np.zeros(len(VOC_CLASSES), bool)
    for k, obj in enumerate(tree.getroot().iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in column_of:
            raise LabelSetError(f"{path}: field 'object[{k}]/name': '{name}' is not one of the 20 VOC classes")
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise LabelSetError(f"{path}: field 'object[{k}]/difficult': '{flag}' is not 0 or 1")
        (hard if flag == "1" else plain)[column_of[name]] = True
    labels = np.zeros(len(VOC_CLASSES), np.int8)
    labels[hard] = difficult_value
    labels[plain] = 1  # a non-difficult object of the class makes it positive whatever else is there
    return labels


def _labels_from_lists(main: Path, split: str, difficult_value: int) -> tuple[list[str], np.ndarray]:
    value_of = {"1": 1, "-1": 0, "0": difficult_value}
    columns: list[dict[str, int]] = []
    for name in VOC_CLASSES:
        path = main / f"{name}_{split}.txt"
        column: dict[str, int] = {}
        for number, line in enumerate(read_lines(path, "expected a VOC per-class list"), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in value_of:
                raise LabelSetError(f"{path}: line {number}: expected '<image id> <1|-1|0>', got '{line.strip()}'")
            if fields[0] in column:
                raise LabelSetError(f"{path}: line {number}: image id '{fields[0]}' listed twice")
            column[fields[0]] = value_of[fields[1]]
        columns.append(column)
    image_list = main / f"{split}.txt"
    ids = _read_ids(image_list) if image_list.is_file() else list(columns[0])
    targets = np.zeros((len(ids), len(VOC_CLASSES)), np.int8)
    for j, (name, column) in enumerate(zip(VOC_CLASSES, columns)):
        missing = next((i for i in ids if i not in column), None)
        if missing is not None or len(column) != len(ids):
            what = f"image '{missing}' is missing" if missing else f"{len(column)} images listed, expected {len(ids)}"
            raise LabelSetError(f"{main / f'{name}_{split}.txt'}: {what}; the lists of one split must cover the "
                                f"same images")
        targets[:, j] = [column[i] for i in ids]
    return ids, targets
