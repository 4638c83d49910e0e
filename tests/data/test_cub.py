"""CUB-200-2011 attribute reader on a tiny copy of the archive's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic.data.cub import read_cub
from mlic.data.labelset import LabelSetError

ATTRIBUTES = ["has_bill_shape::curved_(up_or_down)", "has_bill_shape::dagger", "has_wing_color::blue",
              "has_wing_color::brown", "has_size::small_(5_-_9_in)"]
IMAGES = {1: "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg",
          2: "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg",
          3: "014.Indigo_Bunting/Indigo_Bunting_0063_11820.jpg"}
IS_TRAIN = {1: 1, 2: 0, 3: 1}
# (image, attribute) -> (is_present, certainty_id); 1 not visible, 2 guessing, 3 probably, 4 definitely
LABELS = {
    1: [(0, 3), (1, 4), (0, 1), (1, 2), (0, 4)],
    2: [(1, 4), (0, 3), (0, 4), (1, 4), (0, 1)],
    3: [(0, 2), (0, 4), (1, 3), (0, 4), (1, 4)],
}


def write_cub(parent: Path, extra_field_line: bool = True) -> Path:
    root = parent / "CUB_200_2011"
    (root / "attributes").mkdir(parents=True)
    (parent / "attributes.txt").write_text("".join(f"{j + 1} {a}\n" for j, a in enumerate(ATTRIBUTES)))
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in IMAGES.items()))
    (root / "train_test_split.txt").write_text("".join(f"{i} {IS_TRAIN[i]}\n" for i in IMAGES))
    lines = []
    for image_id, rows in LABELS.items():
        for j, (present, certainty) in enumerate(rows):
            lines.append(f"{image_id} {j + 1} {present} {certainty} {3.5 + j:.3f}")
    if extra_field_line:
        lines[7] += " 0"  # a few lines of the real file carry one field too many
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    for path in IMAGES.values():
        (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (10, 20, 30)).save(root / "images" / path, quality=90)
    return root


def expected(ids, min_certainty=1):
    return np.array([[p if c >= min_certainty else -1 for p, c in LABELS[i]] for i in ids])


def test_is_present_as_cole_et_al(tmp_path):
    root = write_cub(tmp_path)
    sets = read_cub(tmp_path)  # the parent folder works too
    assert list(sets) == ["train", "test"]
    train, test = sets["train"], sets["test"]
    assert train.classes == ATTRIBUTES and train.root == str(root)
    assert train.image_paths == [f"images/{IMAGES[1]}", f"images/{IMAGES[3]}"]
    assert test.image_paths == [f"images/{IMAGES[2]}"]
    np.testing.assert_array_equal(train.targets, expected([1, 3]))
    np.testing.assert_array_equal(test.targets, expected([2]))
    assert train.targets[0].tolist() == [0, 1, 0, 1, 0]  # certainty ignored: "not visible" 0 stays 0
    assert all(train.path(i).is_file() for i in range(len(train)))


def test_min_certainty_marks_unsure_entries_unknown(tmp_path):
    write_cub(tmp_path)
    sets = read_cub(tmp_path / "CUB_200_2011", min_certainty=3)
    np.testing.assert_array_equal(sets["train"].targets, expected([1, 3], 3))
    assert sets["train"].targets[0].tolist() == [0, 1, -1, -1, 0]


def test_malformed_files(tmp_path):
    root = write_cub(tmp_path)
    labels = root / "attributes" / "image_attribute_labels.txt"
    text = labels.read_text()
    labels.write_text(text.replace("2 3 0 4", "2 3 0 7"))
    with pytest.raises(LabelSetError, match=r"image_attribute_labels.txt: row 8: field 'certainty_id' is invalid"):
        read_cub(root)
    labels.write_text(text.replace("3 5 1 4", "3 5 x 4"))
    with pytest.raises(LabelSetError, match=r"image_attribute_labels.txt: expected <image_id> .* could not convert"):
        read_cub(root)
    labels.write_text("\n".join(text.splitlines()[:-1]) + "\n")
    with pytest.raises(LabelSetError, match=r"image 3 has no line for attribute 5"):
        read_cub(root)
    labels.write_text(text.replace("1 1 0 3", "1 2 0 3"))
    with pytest.raises(LabelSetError, match=r"image 1 has no line for attribute 1"):
        read_cub(root)
    labels.write_text(text)
    (root / "train_test_split.txt").write_text("1 1\n2 maybe\n3 0\n")
    with pytest.raises(LabelSetError, match=r"train_test_split.txt: line 2: field 'is_training_image' is invalid"):
        read_cub(root)
    (root / "train_test_split.txt").write_text("".join(f"{i} {IS_TRAIN[i]}\n" for i in IMAGES))
    (tmp_path / "attributes.txt").unlink()
    with pytest.raises(LabelSetError, match=r"attributes.txt: not found"):
        read_cub(root)
