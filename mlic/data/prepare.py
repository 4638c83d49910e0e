"""Turn a data set on disk into LabelSet folders, one per split: ``prepare("coco", root, out)``.

Split folders written under ``out``:

========  =====================================  ==========================================
kind      splits (source)                        with ``val_fraction`` > 0
========  =====================================  ==========================================
coco      train (train2014), val (val2014)       train, val (from train), test (val2014)
voc       train (trainval), test (test) — 2007;  train, val (from train), test
          train (train), val (val) — 2012
nuswide   train, test                            train, val (from train), test
cub       train, test                            train, val (from train), test
table     train (root), val / test (options)     train, val (from train), test
openimages train, val (validation), test         — (already has val and test)
========  =====================================  ==========================================

Carving a validation split follows Cole et al.: ``RandomState(seed).permutation(N)``; the last
``round(val_fraction * N)`` of it (sorted) are validation, the rest (sorted) train. Observed labels
(``observe``) are drawn on the whole source training split before carving, as Cole et al. do, so
the carved validation split carries observed labels too; evaluation splits keep clean labels only.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlic.data.coco import read_coco_splits
from mlic.data.cub import read_cub
from mlic.data.labelset import LabelSet, LabelSetContentError, LabelSetError, check_image_paths
from mlic.data.nuswide import read_nuswide
from mlic.data.observe import observe as draw_observed
from mlic.data.table import read_table
from mlic.data.voc import find_voc, read_voc
from mlic.errors import MlicError
from mlic.io import folder_swap


def _coco(root: Path, order: str = "all", year: str = "2014") -> dict[str, LabelSet]:
    return read_coco_splits(root, order=order, year=year)


def _voc(root: Path, year: str | None = None, splits: tuple[str, str] | None = None, source: str = "xml",
         difficult: str = "unknown") -> dict[str, LabelSet]:
    folder = find_voc(root, year)
    if splits is None:
        splits = ("trainval", "test") if (folder / "ImageSets" / "Main" / "test.txt").is_file() else ("train", "val")
    train, held_out = splits
    return {
        "train": read_voc(folder, train, source=source, difficult=difficult),
        "test" if held_out == "test" else "val": read_voc(folder, held_out, source=source, difficult=difficult),
    }


def _nuswide(root: Path, images: str = "Flickr", drop_missing: bool = False,
             drop_unlabeled: bool = False) -> dict[str, LabelSet]:
    return {split: read_nuswide(root, split, images=images, drop_missing=drop_missing, drop_unlabeled=drop_unlabeled)
            for split in ("train", "test")}


def _cub(root: Path, min_certainty: int = 1) -> dict[str, LabelSet]:
    return read_cub(root, min_certainty=min_certainty)


def _table(root: Path, images: str | None = None, classes: list[str] | None = None, val: str | None = None,
           test: str | None = None) -> dict[str, LabelSet]:
    sets = {"train": read_table(root, images=images, classes=classes, split="train")}
    for split, path in (("val", val), ("test", test)):
        if path is not None:
            # same classes, same column order, same image folder unless the table sits elsewhere
            sets[split] = read_table(path, images=images, classes=sets["train"].classes, split=split)
    return sets


def _cole(root: Path, images: str | None = None, classes: list[str] | None = None) -> dict[str, LabelSet]:
    """Cole et al.'s formatted_{train,val}_*.npy files; their val (the official val set) is our test."""
    from mlic.data.formatted import import_formatted

    image_root = images or root
    return {"train": import_formatted(root, "train", image_root, classes),
            "test": import_formatted(root, "val", image_root, classes, observed=False)}


def _openimages(root: Path, trainable: str | None = None, drop_missing: bool = False,
                progress: bool = True) -> dict[str, LabelSet]:
    """OpenImages V6/V7 human-verified image labels, stored sparsely (see mlic/data/openimages.py)."""
    from mlic.data.openimages import read_openimages

    return read_openimages(root, trainable=trainable, drop_missing=drop_missing, progress=progress)


READERS: dict[str, Callable[..., dict[str, LabelSet]]] = {
    "coco": _coco, "voc": _voc, "nuswide": _nuswide, "cub": _cub, "table": _table, "cole": _cole,
    "openimages": _openimages,
}


def kind_options(kind: str) -> dict[str, object]:
    """The options ``prepare`` accepts for ``kind`` beyond the common ones, with their defaults."""
    if kind not in READERS:
        raise MlicError(f"unknown data set kind '{kind}'; choose one of {sorted(READERS)}")
    params = list(inspect.signature(READERS[kind]).parameters.values())[1:]
    return {p.name: p.default for p in params}


def prepare(kind: str, root: str | os.PathLike, out: str | os.PathLike, observe: str | None = None,
            seed: int = 1200, val_fraction: float = 0.0, **options) -> dict[str, Path]:
    """Read a data set and write one LabelSet folder per split under ``out``.

    Args:
        kind: "coco", "voc", "nuswide", "cub", "table", "cole" or "openimages".
        root: the data set folder (for "table": the table file).
        out: folder receiving ``out/<split>/`` (LabelSet.save layout; image root stored relative).
        observe: None (full labels), "single-positive" or "partial:P"; drawn on the training split.
        seed: seed for the observation draw and for carving the validation split.
        val_fraction: fraction of the training split moved to a new "val" split (0 = none).
        **options: per kind (defaults in brackets):
            coco: order ["all"] ("cole" = images with annotations, string-sorted ids), year ["2014"];
            voc: year [auto], splits [("trainval", "test") when test.txt exists, else ("train", "val")],
                source ["xml"] or "lists", difficult ["unknown"], "positive", "negative";
            nuswide: images ["Flickr"], drop_missing [False], drop_unlabeled [False];
            cub: min_certainty [1] (1 keeps all, as Cole et al.);
            table: images [the table's folder], classes [from the table], val [None], test [None]
                (further table files with the same classes);
            openimages: trainable [None] (file of LabelNames, one a line), drop_missing [False],
                progress [True].

    Returns:
        {split: folder} for every split written.

    Raises:
        LabelSetError: an annotation file is malformed (one line naming file and field), a class name is
            empty, repeated, not a string or not on one line, or an image path leaves the image folder
            (absolute, or with a ``..`` component; symbolic links inside it are followed as they are).
        ValueError: an unknown kind, option or observation scheme.
    """
    known = kind_options(kind)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MlicError(f"unknown option(s) {unknown} for {kind}; it takes {sorted(known)}")
    if not 0.0 <= val_fraction < 1.0:
        raise MlicError(f"val_fraction must be in [0, 1), got {val_fraction}")
    draw_observed(np.zeros((0, 1), np.int8), observe, seed)  # an unknown scheme fails before any reading
    try:
        sets = READERS[kind](Path(root), **options)
    except LabelSetContentError as e:  # a reader built a LabelSet its files cannot make; name them
        raise LabelSetError(f"{root}: {e}") from None
    for split, labelset in sets.items():  # every reader: no image path may leave its image folder
        check_image_paths(labelset.image_paths, f"{root}: {split} split")
    observed = draw_observed(sets["train"].targets, observe, seed)
    if observed is not None:
        sets["train"] = sets["train"].with_observed(observed)
    if val_fraction > 0:
        sets = _carve_validation(sets, val_fraction, seed)

    record = {"kind": kind, "root": str(root), "observe": observe, "seed": seed, "val_fraction": val_fraction,
              "options": json.loads(json.dumps(options, default=str))}
    out = Path(out)
    check_replaceable(out)
    with folder_swap(out) as tmp:  # built beside out, so the relative image root stays right after the swap
        for split, labelset in sets.items():
            labelset.meta = {**labelset.meta, "source_split": labelset.split, "prepare": record}
            labelset.split = split
            labelset.save(tmp / split)
    return {split: out / split for split in sets}


def check_replaceable(out: Path) -> None:
    """``out`` may be (re)written as a whole: absent, empty, or a prepared folder (LabelSet folders only).

    Raises:
        LabelSetError: ``out`` holds anything else, which replacing it would delete.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise LabelSetError(f"{out}: --out is a file; give a folder for the prepared data")
    others = [p.name for p in out.iterdir()
              if not p.name.startswith(".") and not (p.is_dir() and (p / "labelset.json").is_file())]
    if others:
        raise LabelSetError(f"{out}: holds {', '.join(sorted(others)[:3])}, not only prepared splits; --out is "
                            "replaced as a whole, so choose a new or empty folder")


def _carve_validation(sets: dict[str, LabelSet], fraction: float, seed: int) -> dict[str, LabelSet]:
    if "val" in sets and "test" in sets:
        raise MlicError("the data set already has val and test splits; val_fraction must be 0")
    train, val = sets["train"].hold_out(fraction, seed)
    carved = {"train": train, "val": val}
    for split, labelset in sets.items():
        if split != "train":
            carved["test"] = labelset
    return carved
