"""Read COCO-format instance annotations (COCO 2014/2017 or a user's own) into LabelSets.

An image is positive for a category when it has at least one annotation of it; crowd
(``iscrowd``) annotations count too. Category ids need not be contiguous.

Two row orders:

- ``order="all"`` (Query2Label, torchvision's CocoDetection): every image in ``images``, those
  without annotations included as all-negative rows, sorted by image id; classes in
  category-id order. COCO val2014 gives 40,504 rows.
- ``order="cole"`` (Cole et al. 2021, ``preproc/format_coco.py``): only images with at least one
  annotation, sorted by the image id *as a string* ("100" before "9"); classes in the order of the
  JSON's ``categories`` list. COCO train2014 gives 82,081 rows, val2014 40,137.

For COCO 2014 both class orders coincide (the JSON lists categories by id).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
from pathlib import Path
from typing import Literal

import numpy as np
from pycocotools.coco import COCO

from mlic.data.labelset import LabelSet, LabelSetError, class_name_problem, image_path_problem
from mlic.errors import MlicError
from mlic.registry import register_reader

ORDERS = ("all", "cole")


def read_coco(annotation_file: str | os.PathLike, images: str | os.PathLike, order: str = "all",
              root: str | os.PathLike | None = None, split: str = "") -> LabelSet:
    """Read a COCO instances JSON into a LabelSet.

    Args:
        annotation_file: ``instances_*.json`` with ``images``, ``annotations`` and ``categories``.
        images: folder the images' ``file_name`` entries are relative to.
        order: "all" or "cole" (see the module docstring).
        root: LabelSet root; image paths are stored relative to it. Default: ``images``.
        split: split name stored in the LabelSet.

    Returns:
        LabelSet with targets int8 (N, K) of 1/0; ``meta["category_ids"]`` holds the COCO ids of the K
        columns and ``meta["image_ids"]`` the COCO ids of the N rows.

    Raises:
        LabelSetError: the file is missing, not JSON, or a field is missing or inconsistent.
    """
    if order not in ORDERS:
        raise MlicError(f"unknown COCO order '{order}'; choose one of {ORDERS}")
    path = Path(annotation_file)
    data = _load_json(path)
    _check(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()

    if order == "cole":
        category_ids = [c["id"] for c in data["categories"]]
        image_ids = sorted((i for i in coco.imgToAnns if coco.imgToAnns[i]), key=str)
    else:
        category_ids = sorted(c["id"] for c in data["categories"])
        image_ids = sorted(coco.imgs)
    column = {cid: j for j, cid in enumerate(category_ids)}
    targets = np.zeros((len(image_ids), len(category_ids)), dtype=np.int8)
    for row, image_id in enumerate(image_ids):
        for ann in coco.imgToAnns.get(image_id, ()):
            targets[row, column[ann["category_id"]]] = 1

    images = Path(images)
    root = images if root is None else Path(root)
    prefix = os.path.relpath(images, root).replace(os.sep, "/")
    prefix = "" if prefix == "." else prefix + "/"
    paths = [prefix + coco.imgs[i]["file_name"] for i in image_ids]
    meta = {
        "source": "coco",
        "annotation_file": str(path),
        "order": order,
        "category_ids": category_ids,
        "image_ids": image_ids,
        "images_without_annotations": sum(1 for i in coco.imgs if not coco.imgToAnns.get(i)),
    }
    classes = [coco.cats[cid]["name"] for cid in category_ids]
    return LabelSet(classes, paths, targets, root=str(root), split=split, meta=meta)


def read_coco_splits(root: str | os.PathLike, order: str = "all", year: str = "2014",
                     splits: tuple[str, ...] = ("train", "val")) -> dict[str, LabelSet]:
    """Read the official COCO layout: ``annotations/instances_{split}{year}.json`` and ``{split}{year}/``.

    Args:
        root: COCO folder holding ``annotations/`` and the image folders.
        order: "all" (Query2Label) or "cole" (Cole et al.).
        year: "2014" or "2017".
        splits: which splits to read.

    Returns:
        {split: LabelSet}, image paths like ``train2014/COCO_train2014_000000000009.jpg`` under ``root``.

    Raises:
        LabelSetError: a file is malformed, or the splits disagree on the categories.
    """
    root = Path(root)
    sets: dict[str, LabelSet] = {}
    for split in splits:
        sets[split] = read_coco(root / "annotations" / f"instances_{split}{year}.json", root / f"{split}{year}",
                                order=order, root=root, split=split)
    first = next(iter(sets.values()), None)
    for split, labelset in sets.items():
        if (labelset.classes, labelset.meta["category_ids"]) != (first.classes, first.meta["category_ids"]):
            raise LabelSetError(f"{labelset.meta['annotation_file']}: field 'categories' differs from "
                                f"{first.meta['annotation_file']}; both splits must share one category list")
    return sets


@register_reader("coco")
def prepare_coco(root: Path, order: Literal["all", "cole"] = "all", year: str = "2014") -> dict[str, LabelSet]:
    """``mlic prepare coco``: train (train{year}) and val (val{year}) of the official layout."""
    return read_coco_splits(root, order=order, year=year)


def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LabelSetError(f"{path}: not found; expected a COCO instances JSON") from None
    except IsADirectoryError:
        raise LabelSetError(f"{path}: is a folder, expected a COCO instances JSON") from None
    except json.JSONDecodeError as e:
        raise LabelSetError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise LabelSetError(f"{path}: not UTF-8 JSON (byte {e.start}: {e.reason})") from None


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entries(path, entries: list, section: str, noun: str, text_key: str, unique_text: bool) -> set[int]:
    """Check that each entry has an integer ``id`` and a non-empty string ``text_key``, ids (and, if asked,
    texts) unique; return the ids."""
    ids: set[int] = set()
    texts: set[str] = set()
    for i, entry in enumerate(entries):
        field = f"{section}[{i}]"
        if not isinstance(entry, dict) or not _is_id(entry.get("id")):
            raise LabelSetError(f"{path}: field '{field}.id' is missing or not an integer")
        if not isinstance(entry.get(text_key), str) or not entry[text_key]:
            raise LabelSetError(f"{path}: field '{field}.{text_key}' is missing or not a string")
        if text_key == "name" and (problem := class_name_problem(entry["name"])) is not None:
            raise LabelSetError(f"{path}: field '{field}.name': class {entry['name']!r} {problem}; class names "
                                "must be non-empty strings on one line")
        if entry["id"] in ids:
            raise LabelSetError(f"{path}: field '{field}.id': {noun} id {entry['id']} appears twice")
        if unique_text and entry[text_key] in texts:
            raise LabelSetError(f"{path}: field '{field}.{text_key}': {noun} {text_key} '{entry[text_key]}' "
                                "appears twice")
        ids.add(entry["id"])
        texts.add(entry[text_key])
    return ids


def _check(path: Path, data) -> None:
    """Every field the reader and pycocotools' index touch, checked before use."""
    if not isinstance(data, dict):
        raise LabelSetError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "missing" if key not in data else f"not a list ({type(data[key]).__name__})"
            raise LabelSetError(f"{path}: field '{key}' is {what}; expected a COCO instances file")
    if not data["categories"]:
        raise LabelSetError(f"{path}: field 'categories' is empty")
    category_ids = _check_entries(path, data["categories"], "categories", "category", "name", unique_text=True)
    image_ids = _check_entries(path, data["images"], "images", "image", "file_name", unique_text=False)
    owner: dict[str, int] = {}  # normalised file name -> id of the first image with it
    for i, entry in enumerate(data["images"]):
        name = entry["file_name"]
        if (problem := image_path_problem(name)) is not None:
            raise LabelSetError(f"{path}: field 'images[{i}].file_name': {name!r} leaves the image folder "
                                f"({problem}); file names must be relative paths inside it")
        key = posixpath.normpath(name.replace("\\", "/"))
        if key in owner:
            raise LabelSetError(f"{path}: field 'images[{i}].file_name': images {owner[key]} and {entry['id']} "
                                f"share the file name {name!r}; each image id needs its own file")
        owner[key] = entry["id"]
    for i, ann in enumerate(data["annotations"]):
        field = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise LabelSetError(f"{path}: field '{field}' is not an object")
        for key in ("id", "image_id", "category_id"):
            if not _is_id(ann.get(key)):
                raise LabelSetError(f"{path}: field '{field}.{key}' is missing or not an integer")
        if ann["image_id"] not in image_ids:
            raise LabelSetError(f"{path}: field '{field}.image_id': image {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise LabelSetError(
                f"{path}: field '{field}.category_id': category {ann['category_id']} is not in 'categories'")
