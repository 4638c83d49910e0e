import json

import numpy as np
import pytest

from mlic.data.labelset import LabelSet, LabelSetError


def make(n=5, k=3, observed=False):
    rng = np.random.RandomState(0)
    targets = rng.randint(-1, 2, size=(n, k)).astype(np.int8)
    obs = np.where(rng.rand(n, k) < 0.5, targets, -1).astype(np.int8) if observed else None
    return LabelSet([f"c{i}" for i in range(k)], [f"img/{i}.jpg" for i in range(n)], targets, root="/data",
                    split="train", observed=obs)


def test_round_trip_is_memory_mapped_and_equal(tmp_path):
    ls = make(observed=True)
    ls.save(tmp_path / "ls")
    back = LabelSet.load(tmp_path / "ls")
    assert back.classes == ls.classes and back.image_paths == ls.image_paths and back.split == "train"
    np.testing.assert_array_equal(back.targets, ls.targets)
    np.testing.assert_array_equal(back.observed, ls.observed)
    assert isinstance(back.targets, np.memmap) and back.targets.dtype == np.int8
    assert back.root == "/data"


def test_root_is_stored_relative_so_the_folder_can_move(tmp_path):
    images = tmp_path / "a" / "images"
    images.mkdir(parents=True)
    ls = LabelSet(["x"], ["images/1.png"], np.ones((1, 1), np.int8), root=str(tmp_path / "a"))
    ls.save(tmp_path / "a" / "prepared")
    (tmp_path / "a").rename(tmp_path / "b")
    back = LabelSet.load(tmp_path / "b" / "prepared")
    assert back.path(0) == (tmp_path / "b" / "images" / "1.png").resolve()


def test_train_targets_prefers_observed():
    ls = make(observed=True)
    assert ls.train_targets is ls.observed
    assert make().train_targets is make().targets or np.array_equal(make().train_targets, make().targets)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": np.full((2, 2), 2, np.int8)}, "may hold only"),
        ({"targets": np.zeros((2, 3), np.int8)}, "2 class names but targets have 3 columns"),
        ({"image_paths": ["a"]}, "1 image paths but targets have 2 rows"),
        ({"classes": ["a", "a"]}, "duplicate class names"),
        ({"targets": np.zeros(4, np.int8)}, "2-D"),
        ({"observed": np.zeros((1, 2), np.int8)}, "observed has shape"),
    ],
)
def test_validation(kwargs, message):
    args = {"classes": ["a", "b"], "image_paths": ["x", "y"], "targets": np.zeros((2, 2), np.int8)} | kwargs
    with pytest.raises(LabelSetError, match=message):
        LabelSet(**args)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(LabelSetError, match="labelset.json: not found"):
        LabelSet.load(tmp_path)
    (tmp_path / "labelset.json").write_text("{broken")
    with pytest.raises(LabelSetError, match="not valid JSON"):
        LabelSet.load(tmp_path)
    (tmp_path / "labelset.json").write_text(json.dumps({"classes": ["a"]}))
    with pytest.raises(LabelSetError, match="missing field 'image_paths'"):
        LabelSet.load(tmp_path)


def test_subset_copies_rows():
    ls = make(observed=True)
    sub = ls.subset([3, 1], split="val")
    assert sub.image_paths == ["img/3.jpg", "img/1.jpg"] and sub.split == "val"
    np.testing.assert_array_equal(sub.targets, ls.targets[[3, 1]])
    np.testing.assert_array_equal(sub.observed, ls.observed[[3, 1]])
