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
import typing
from pathlib import Path

import numpy as np

from mlic.data.labelset import LabelSet, LabelSetContentError, LabelSetError, check_image_paths
from mlic.data.observe import observe as draw_observed
from mlic.errors import MlicError
from mlic.io import folder_swap
from mlic.registry import READERS, get_reader, register_reader  # noqa: F401  (READERS, register_reader re-exported)


def kind_options(kind: str) -> dict[str, object]:
    """The options ``prepare`` accepts for ``kind`` beyond the common ones, with their defaults."""
    params = list(inspect.signature(get_reader(kind)).parameters.values())[1:]
    return {p.name: p.default for p in params}


def describe_options(kind: str) -> str:
    """``kind``'s reader options for a help text: ``key=a|b`` (choices, default first), ``key=default``, or
    ``key`` alone (no default: the reader decides, e.g. from the files)."""
    reader = get_reader(kind)
    try:
        signature = inspect.signature(reader, eval_str=True)
    except (NameError, TypeError, SyntaxError):  # a user's reader with annotations that do not resolve
        signature = inspect.signature(reader)
    shown = []
    for p in list(signature.parameters.values())[1:]:
        choices = typing.get_args(p.annotation) if typing.get_origin(p.annotation) is typing.Literal else ()
        if choices:
            shown.append(f"{p.name}={'|'.join(str(c) for c in sorted(choices, key=lambda c: c != p.default))}")
        elif p.default is None or p.default is p.empty:
            shown.append(p.name)
        else:
            shown.append(f"{p.name}={str(p.default).lower() if isinstance(p.default, bool) else p.default}")
    return " ".join(shown)


def prepare(kind: str, root: str | os.PathLike, out: str | os.PathLike, observe: str | None = None,
            seed: int = 1200, val_fraction: float = 0.0, **options) -> dict[str, Path]:
    """Read a data set and write one LabelSet folder per split under ``out``.

    Args:
        kind: a registered reader (mlic.registry.READERS): "coco", "voc", "nuswide", "cub", "table", "cole",
            "openimages", or one a user registered with ``@register_reader``.
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
        sets = get_reader(kind)(Path(root), **options)
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
