"""Cole et al.'s formatted_{split}_{labels,images,labels_obs}.npy <-> LabelSet."""

from __future__ import annotations

import numpy as np
import pytest

from mlic.data.formatted import export_formatted, formatted_paths, import_formatted
from mlic.data.labelset import LabelSet


def write_theirs(directory, split="train"):
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float64)
    obs = np.array([[1, 0, 0], [0, 1, -1], [0, 1, 0], [-1, 0, 1]], dtype=np.float64)  # +1 / 0 unobserved / -1
    images = np.array([f"{split}2014/COCO_{split}2014_{i:012d}.jpg" for i in (9, 25, 30, 34)])
    paths = formatted_paths(directory, split)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(paths["labels"], labels)
    np.save(paths["labels_obs"], obs)
    np.save(paths["images"], images)
    return labels, obs, images


def test_import_converts_encoding(tmp_path):
    labels, obs, images = write_theirs(tmp_path)
    ls = import_formatted(tmp_path, "train", root="/data/coco", classes=["person", "dog", "cat"])
    assert ls.classes == ["person", "dog", "cat"] and ls.split == "train" and ls.root == "/data/coco"
    assert ls.image_paths[0] == "train2014/COCO_train2014_000000000009.jpg"
    np.testing.assert_array_equal(ls.targets, labels.astype(np.int8))
    expected = np.array([[1, -1, -1], [-1, 1, 0], [-1, 1, -1], [0, -1, 1]], dtype=np.int8)
    np.testing.assert_array_equal(ls.observed, expected)
    assert import_formatted(tmp_path, "train", observed=False).observed is None
    assert import_formatted(tmp_path, "train").classes == ["0", "1", "2"]


def test_round_trip(tmp_path):
    labels, obs, images = write_theirs(tmp_path / "theirs")
    ls = import_formatted(tmp_path / "theirs", "train")
    written = export_formatted(ls, tmp_path / "ours", "train")
    assert set(written) == {"labels", "images", "labels_obs"}
    np.testing.assert_array_equal(np.load(written["labels"]), labels)
    np.testing.assert_array_equal(np.load(written["labels_obs"]), obs)
    np.testing.assert_array_equal(np.load(written["images"]), images)
    back = import_formatted(tmp_path / "ours", "train")
    np.testing.assert_array_equal(back.targets, ls.targets)
    np.testing.assert_array_equal(back.observed, ls.observed)
    assert back.image_paths == ls.image_paths

    no_obs = LabelSet(["a", "b"], ["x.jpg"], np.array([[1, 0]]), split="val")
    assert set(export_formatted(no_obs, tmp_path / "plain", "val")) == {"labels", "images"}
    unknown = LabelSet(["a", "b"], ["x.jpg"], np.array([[1, -1]]))
    with pytest.raises(ValueError, match="targets"):
        export_formatted(unknown, tmp_path / "bad", "val")


@pytest.mark.parametrize("field,value,message", [
    ("labels", np.ones((4, 3, 1)), "labels.*2-D"),
    ("labels", np.full((4, 3), 0.5), "labels.*only \\[0, 1\\]"),
    ("labels_obs", np.full((4, 3), 2.0), "labels_obs.*only"),
    ("labels_obs", np.zeros((4, 2)), "labels_obs.*shape"),
    ("images", np.array(["a.jpg"] * 3), "images.*3 paths"),
    ("images", np.zeros(4), "images.*strings"),
])
def test_malformed_files_name_file_and_field(tmp_path, field, value, message):
    write_theirs(tmp_path)
    path = formatted_paths(tmp_path, "train")[field]
    np.save(path, value)
    with pytest.raises(ValueError, match=message) as info:
        import_formatted(tmp_path, "train")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_pickled_files(tmp_path):
    write_theirs(tmp_path)
    paths = formatted_paths(tmp_path, "train")
    np.save(paths["images"], np.array(["a", "b", "c", "d"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="images.*Python objects"):
        import_formatted(tmp_path, "train")
    paths["labels"].unlink()
    with pytest.raises(ValueError, match="not found.*labels"):
        import_formatted(tmp_path, "train")
    with pytest.raises(ValueError, match="class names"):
        write_theirs(tmp_path)
        import_formatted(tmp_path, "train", classes=["a"])
