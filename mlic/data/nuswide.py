"""Read NUS-WIDE's 81-concept labels (the commonly used layout) into LabelSets.

Layout under ``root``::

    Concepts81.txt                                    one concept name per line (81)
    ImageList/TrainImagelist.txt, TestImagelist.txt   one path per line, Windows separators:
                                                      ``actor\\0001_2124494179.jpg`` (161,789 / 107,859)
    Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt, ..._Test.txt
                                                      one 0/1 per line, aligned with the image list
    Flickr/<folder>/<file>.jpg                        the images (many original URLs are dead)

Missing image files are counted (``meta["missing_images"]``) and, with ``drop_missing``, dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlic.data.labelset import LabelSet, LabelSetError
from mlic.data.table import read_lines
from mlic.errors import MlicError
from mlic.registry import register_reader

SPLITS = {"train": "Train", "test": "Test"}


def read_concepts(root: str | os.PathLike) -> list[str]:
    """Concept names from ``Concepts81.txt`` (also looked for in ``ConceptsList/``)."""
    root = Path(root)
    path = root / "Concepts81.txt"
    if not path.is_file() and (root / "ConceptsList" / "Concepts81.txt").is_file():
        path = root / "ConceptsList" / "Concepts81.txt"
    concepts = [line.strip() for line in read_lines(path, "expected NUS-WIDE's list of 81 concepts") if line.strip()]
    if not concepts:
        raise LabelSetError(f"{path}: no concept names")
    return concepts


def read_nuswide(root: str | os.PathLike, split: str = "train", images: str = "Flickr", drop_missing: bool = False,
                 drop_unlabeled: bool = False) -> LabelSet:
    """Read the NUS-WIDE train or test split.

    Args:
        root: NUS-WIDE folder (see the module docstring).
        split: "train" or "test".
        images: image folder, relative to ``root``.
        drop_missing: drop rows whose image file does not exist (they are counted either way).
        drop_unlabeled: drop rows with none of the concepts.

    Returns:
        LabelSet with targets int8 (N, 81) of 1/0, rows in image-list order. ``meta`` holds
        ``listed`` (rows in the list), ``missing_images``, ``dropped_missing``, ``dropped_unlabeled``.

    Raises:
        LabelSetError: a file is missing, a label file has the wrong length or a value other than 0/1.
    """
    if split not in SPLITS:
        raise MlicError(f"unknown NUS-WIDE split '{split}'; choose train or test")
    root = Path(root)
    concepts = read_concepts(root)
    list_path = root / "ImageList" / f"{SPLITS[split]}Imagelist.txt"
    paths = [f"{images}/" + line.strip().replace("\\", "/")
             for line in read_lines(list_path, "expected NUS-WIDE's ImageList folder") if line.strip()]
    targets = np.zeros((len(paths), len(concepts)), dtype=np.int8)
    for j, concept in enumerate(concepts):
        label_path = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{SPLITS[split]}.txt"
        values = [line.strip() for line in read_lines(label_path, "expected Groundtruth/TrainTestLabels")]
        while values and not values[-1]:
            values.pop()
        if len(values) != len(paths):
            raise LabelSetError(f"{label_path}: {len(values)} labels but {list_path.name} lists {len(paths)} images")
        values = np.array(values, dtype=str)
        ones = values == "1"
        bad = ~ones & (values != "0")
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise LabelSetError(f"{label_path}: line {k + 1}: value '{values[k]}' is not 0 or 1")
        targets[:, j] = ones

    missing = np.array([not os.path.isfile(root / p) for p in paths], dtype=bool)
    unlabeled = targets.max(axis=1, initial=0) == 0
    keep = np.ones(len(paths), dtype=bool)
    dropped_missing = dropped_unlabeled = 0
    if drop_missing:
        dropped_missing = int(missing.sum())
        keep &= ~missing
    if drop_unlabeled:
        dropped_unlabeled = int((keep & unlabeled).sum())
        keep &= ~unlabeled
    meta = {
        "source": "nuswide",
        "listed": len(paths),
        "missing_images": int(missing.sum()),
        "dropped_missing": dropped_missing,
        "dropped_unlabeled": dropped_unlabeled,
    }
    kept = np.flatnonzero(keep)
    return LabelSet(concepts, [paths[i] for i in kept], targets[kept], root=str(root), split=split, meta=meta)


@register_reader("nuswide")
def prepare_nuswide(root: Path, images: str = "Flickr", drop_missing: bool = False,
                    drop_unlabeled: bool = False) -> dict[str, LabelSet]:
    """``mlic prepare nuswide``: its train and test splits."""
    return {split: read_nuswide(root, split, images=images, drop_missing=drop_missing, drop_unlabeled=drop_unlabeled)
            for split in ("train", "test")}
