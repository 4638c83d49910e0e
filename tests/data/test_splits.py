"""mlic.data.splits: which LabelSets train and eval use: prepared folders, hold-out, observation, MultiDigits."""

from __future__ import annotations

import numpy as np
import pytest

from mlic.data.digits import DigitsSpec
from mlic.data.labelset import LabelSet, LabelSetError, cole_split
from mlic.data.observe import observe
from mlic.data.splits import evaluation_split, parse_digits_size, training_splits
from mlic.errors import MlicError

CLASSES = ["cat", "dog", "owl"]


def labelset(split: str, n: int, seed: int, classes=CLASSES) -> LabelSet:
    rng = np.random.RandomState(seed)
    targets = (rng.rand(n, len(classes)) < 0.5).astype(np.int8)
    targets[np.arange(n), rng.randint(0, len(classes), n)] = 1  # every image has a positive
    return LabelSet(list(classes), [f"{split}/{i}.png" for i in range(n)], targets, root=".", split=split)


@pytest.fixture
def prepared(tmp_path):
    """``prepared(*splits)``: a prepared folder holding those splits (train 40, val 10, test 12 images)."""
    sizes = {"train": 40, "val": 10, "test": 12}

    def make(*splits, folder="prepared"):
        for i, split in enumerate(splits):
            labelset(split, sizes[split], seed=i).save(tmp_path / folder / split)
        return tmp_path / folder

    return make


def paths(ls: LabelSet) -> list[str]:
    return list(ls.image_paths)


def test_train_val_test_are_used_as_prepared(prepared):
    lines = []
    splits = training_splits(prepared("train", "val", "test"), echo=lines.append)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 12)
    assert paths(splits.val)[0].startswith("val/") and paths(splits.test)[0].startswith("test/")
    assert splits.train.observed is None and splits.shards == {}
    assert not any("held out" in line for line in lines)


@pytest.mark.parametrize("fraction", [0.2, 0.25, 0.5])
def test_without_test_val_is_test_and_validation_is_held_out_of_train(prepared, fraction):
    lines = []
    splits = training_splits(prepared("train", "val"), val_fraction=fraction, echo=lines.append)
    assert paths(splits.test) == [f"val/{i}.png" for i in range(10)]
    train_rows, val_rows = cole_split(40, fraction, 1200)  # Cole et al.'s RandomState(1200) permutation
    assert len(splits.val) == round(fraction * 40)
    assert paths(splits.train) == [f"train/{i}.png" for i in train_rows]
    assert paths(splits.val) == [f"train/{i}.png" for i in val_rows]
    assert splits.val.split == "val" and any(f"{len(splits.val)} images held out" in line for line in lines)


def test_train_alone_has_no_test(prepared):
    splits = training_splits(prepared("train"), val_fraction=0.25, echo=lambda *a: None)
    assert splits.test is None and (len(splits.train), len(splits.val)) == (30, 10)


def test_a_labelset_folder_itself_is_the_training_split(prepared, tmp_path):
    prepared("train")
    splits = training_splits(tmp_path / "prepared" / "train", val_fraction=0.25, echo=lambda *a: None)
    assert len(splits.train) + len(splits.val) == 40 and splits.test is None


def test_observation_is_drawn_on_all_of_train_before_the_hold_out(prepared):
    folder = prepared("train", "test")
    full = LabelSet.load(folder / "train").targets
    splits = training_splits(folder, observe="single-positive", observe_seed=7, val_fraction=0.25,
                             echo=lambda *a: None)
    expected = observe(np.asarray(full), "single-positive", 7)
    train_rows, val_rows = cole_split(40, 0.25, 1200)
    np.testing.assert_array_equal(splits.train.observed, expected[train_rows])
    np.testing.assert_array_equal(splits.val.observed, expected[val_rows])
    assert ((splits.train.observed == 1).sum(1) == 1).all() and not (splits.train.observed == 0).any()
    np.testing.assert_array_equal(splits.train.targets, np.asarray(full)[train_rows])  # clean labels stay
    assert splits.test.observed is None


def test_stored_observed_labels_are_used(prepared, tmp_path):
    train = labelset("train", 40, seed=0)
    train.with_observed(observe(train.targets, "partial:0.5", 3)).save(tmp_path / "stored" / "train")
    lines = []
    splits = training_splits(tmp_path / "stored", val_fraction=0.25, echo=lines.append)
    assert splits.train.observed is not None and "using the observed labels stored" in " ".join(lines)


def test_splits_with_other_classes_are_refused(tmp_path):
    labelset("train", 40, 0).save(tmp_path / "p" / "train")
    labelset("test", 12, 1, classes=["cat", "dog", "emu"]).save(tmp_path / "p" / "test")
    with pytest.raises(LabelSetError, match="the splits have different classes"):
        training_splits(tmp_path / "p", echo=lambda *a: None)


def test_folders_that_are_not_prepared_are_refused(tmp_path, prepared):
    with pytest.raises(LabelSetError, match="no such folder; make one with 'mlic prepare'"):
        training_splits(tmp_path / "absent", echo=lambda *a: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelSetError, match="no train/, val/ or test/ LabelSet inside"):
        training_splits(tmp_path / "empty", echo=lambda *a: None)
    with pytest.raises(LabelSetError, match="no train/ LabelSet inside"):
        training_splits(prepared("val", "test"), echo=lambda *a: None)


def test_evaluation_split(prepared, tmp_path):
    both = prepared("train", "val", "test")
    assert paths(evaluation_split(both))[0] == "test/0.png"
    assert paths(evaluation_split(both, "val"))[0] == "val/0.png"
    assert paths(evaluation_split(both / "train"))[0] == "train/0.png"  # a LabelSet folder is itself
    no_test = prepared("train", "val", folder="no_test")
    assert paths(evaluation_split(no_test))[0] == "val/0.png"  # as COCO's val2014 serves as test
    with pytest.raises(LabelSetError, match="no LabelSet there; pass --split"):
        evaluation_split(no_test, "train2")


def test_multidigits_by_default_built_into_mlic_cache(tmp_path, monkeypatch):
    cache = tmp_path / "my-cache"
    monkeypatch.setenv("MLIC_CACHE", str(cache))
    lines = []
    splits = training_splits(None, digits_size="24,8,12", echo=lines.append)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 8, 12)
    assert splits.train.classes == [str(d) for d in range(10)] and splits.train.observed is None
    built = [p for p in cache.iterdir() if p.name.startswith("multidigits-")]
    assert len(built) == 1 and (built[0] / "done").exists()
    assert "MultiDigits (train 24, val 8, test 12" in lines[0]
    again = training_splits(None, digits_size="24,8,12", observe="single-positive", echo=lambda *a: None)
    assert paths(again.test) == paths(splits.test) and ((again.train.observed == 1).sum(1) == 1).all()
    assert [p.name for p in cache.iterdir()] == [built[0].name]  # built once, read afterwards


def test_evaluation_split_defaults_to_multidigits_test(monkeypatch):
    sets = {"train": labelset("train", 4, 0), "val": labelset("val", 4, 1), "test": labelset("test", 4, 2)}
    monkeypatch.setattr("mlic.data.digits.build_multidigits", lambda *a, **k: sets)
    assert evaluation_split(None) is sets["test"]


def test_parse_digits_size():
    assert parse_digits_size(None) == DigitsSpec()
    spec = parse_digits_size("100,20,30")
    assert (spec.train, spec.val, spec.test) == (100, 20, 30) and spec.img_size == DigitsSpec().img_size
    with pytest.raises(MlicError, match=r"--digits-size '100,20': write TRAIN,VAL,TEST"):
        parse_digits_size("100,20")
    with pytest.raises(MlicError, match="every split needs at least one image"):
        parse_digits_size("100,0,30")
