"""NUS-WIDE reader on a tiny copy of the common layout (Concepts81.txt, ImageList, TrainTestLabels, Flickr/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic.data.labelset import LabelSetError
from mlic.data.nuswide import read_nuswide

CONCEPTS = ["airport", "animal", "beach", "sky"]
TRAIN = [r"actor\0001_2124494179.jpg", r"airport\0002_174174086.jpg", r"beach\0003_1112161934.jpg",
         r"sky\0004_2357588521.jpg"]
TRAIN_LABELS = np.array([[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
TEST = [r"animal\0005_31234567.jpg", r"sky\0006_1293817.jpg"]
TEST_LABELS = np.array([[0, 1, 0, 0], [0, 0, 0, 1]])
DEAD = {r"sky\0004_2357588521.jpg"}  # a URL that no longer answers: never downloaded


def write_nuswide(root: Path) -> Path:
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth" / "TrainTestLabels").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("".join(f"{c}\n" for c in CONCEPTS))
    for split, names, labels in (("Train", TRAIN, TRAIN_LABELS), ("Test", TEST, TEST_LABELS)):
        (root / "ImageList" / f"{split}Imagelist.txt").write_text("".join(f"{n}\r\n" for n in names))
        for j, concept in enumerate(CONCEPTS):
            path = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{split}.txt"
            path.write_text("".join(f"{v}\n" for v in labels[:, j]))
        for name in names:
            if name in DEAD:
                continue
            image = root / "Flickr" / name.replace("\\", "/")
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 16), (40, 120, 200)).save(image, quality=90)
    return root


def test_train_and_test_labels(tmp_path):
    root = write_nuswide(tmp_path)
    train = read_nuswide(root, "train")
    assert train.classes == CONCEPTS and train.split == "train"
    assert train.image_paths == ["Flickr/" + n.replace("\\", "/") for n in TRAIN]
    np.testing.assert_array_equal(train.targets, TRAIN_LABELS)
    assert train.meta["listed"] == 4 and train.meta["missing_images"] == 1 and train.meta["dropped_missing"] == 0
    test = read_nuswide(root, "test")
    np.testing.assert_array_equal(test.targets, TEST_LABELS)
    assert test.meta["missing_images"] == 0 and all(test.path(i).is_file() for i in range(len(test)))


def test_drop_missing_and_unlabeled(tmp_path):
    root = write_nuswide(tmp_path)
    ls = read_nuswide(root, "train", drop_missing=True)
    assert len(ls) == 3 and ls.meta["dropped_missing"] == 1
    np.testing.assert_array_equal(ls.targets, TRAIN_LABELS[:3])
    assert all(ls.path(i).is_file() for i in range(len(ls)))
    ls = read_nuswide(root, "train", drop_missing=True, drop_unlabeled=True)
    assert ls.image_paths == ["Flickr/airport/0002_174174086.jpg", "Flickr/beach/0003_1112161934.jpg"]
    assert ls.meta["dropped_unlabeled"] == 1


def test_malformed_files(tmp_path):
    root = write_nuswide(tmp_path)
    labels = root / "Groundtruth" / "TrainTestLabels" / "Labels_beach_Train.txt"
    labels.write_text("0\n0\n1\n")
    with pytest.raises(LabelSetError, match=r"Labels_beach_Train.txt: 3 labels but TrainImagelist.txt lists 4"):
        read_nuswide(root, "train")
    labels.write_text("0\n0\n2\n0\n")
    with pytest.raises(LabelSetError, match=r"Labels_beach_Train.txt: line 3: value '2' is not 0 or 1"):
        read_nuswide(root, "train")
    labels.unlink()
    with pytest.raises(LabelSetError, match=r"Labels_beach_Train.txt: not found"):
        read_nuswide(root, "train")
    (root / "Concepts81.txt").unlink()
    with pytest.raises(LabelSetError, match=r"Concepts81.txt: not found"):
        read_nuswide(root, "test")
