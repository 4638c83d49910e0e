"""prepare(): data set on disk -> one LabelSet folder per split that LabelSet.load reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic.data.labelset import LabelSet, LabelSetError
from mlic.data.prepare import kind_options, prepare


def write_coco(root: Path, split: str, labels: dict[int, list[int]]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2014").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id, cats in labels.items():
        name = f"COCO_{split}2014_{image_id:012d}.jpg"
        Image.new("RGB", (16, 12), (image_id % 250, 0, 0)).save(root / f"{split}2014" / name, quality=90)
        images.append({"id": image_id, "file_name": name})
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "category_id": c} for c in cats]
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 4, "name": "motorcycle"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))


@pytest.fixture
def coco(tmp_path) -> Path:
    root = tmp_path / "coco"
    rng = np.random.default_rng(3)
    train = {i: sorted(set(rng.choice([1, 2, 4], size=rng.integers(0, 4)).tolist())) for i in range(1, 41)}
    write_coco(root, "train", train)
    write_coco(root, "val", {100: [1], 101: [], 102: [2, 4]})
    return root


def test_coco_full_labels(coco, tmp_path):
    out = prepare("coco", coco, tmp_path / "out")
    assert out == {"train": tmp_path / "out" / "train", "val": tmp_path / "out" / "val"}
    train, val = LabelSet.load(out["train"]), LabelSet.load(out["val"])
    assert len(train) == 40 and len(val) == 3 and train.observed is None
    assert val.classes == ["person", "bicycle", "motorcycle"]
    np.testing.assert_array_equal(val.targets, [[1, 0, 0], [0, 0, 0], [0, 1, 1]])
    assert all(train.path(i).is_file() for i in range(len(train)))  # root stored so images resolve
    assert train.meta["prepare"]["kind"] == "coco" and train.meta["source_split"] == "train"


def test_coco_cole_protocol(coco, tmp_path):
    """Cole et al.: annotated images only, single positive drawn on all of train, then 20% carved as val."""
    from mlic.data.observe import single_positive

    out = prepare("coco", coco, tmp_path / "out", observe="single-positive", seed=1200, order="cole",
                  val_fraction=0.2)
    assert set(out) == {"train", "val", "test"}
    train, val, test = (LabelSet.load(out[s]) for s in ("train", "val", "test"))
    test_ids = test.meta["image_ids"]
    assert test_ids == [100, 102] and test.observed is None  # 101 has no annotation; test keeps clean labels
    source = np.concatenate([train.targets, val.targets])
    n = len(source)
    assert (len(train), len(val)) == (n - round(0.2 * n), round(0.2 * n))
    # reconstruct the full train matrix in its original (string-sorted id) order and redo the draw
    ids = train.meta["image_ids"]
    assert ids == sorted(ids, key=str)
    order = np.random.RandomState(1200).permutation(n)
    full = np.empty_like(source)
    full[np.sort(order[: n - len(val)])] = train.targets
    full[np.sort(order[-len(val):])] = val.targets
    observed = single_positive(full, 1200)
    np.testing.assert_array_equal(train.observed, observed[np.sort(order[: n - len(val)])])
    np.testing.assert_array_equal(val.observed, observed[np.sort(order[-len(val):])])
    assert ((train.observed == 1).sum(1) == 1).all() and (train.observed != 0).all()
    assert (train.targets[train.observed == 1] == 1).all()


def test_partial_observation(coco, tmp_path):
    out = prepare("coco", coco, tmp_path / "out", observe="partial:0.5", seed=7)
    train = LabelSet.load(out["train"])
    known = train.observed != -1
    assert 0.3 < known.mean() < 0.7
    np.testing.assert_array_equal(train.observed[known], train.targets[known])


def test_voc_default_splits(tmp_path):
    folder = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (folder / sub).mkdir(parents=True)
    for image_id, name in (("000001", "dog"), ("000002", "cat"), ("000003", "bus")):
        (folder / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><object><name>{name}</name><difficult>0</difficult></object></annotation>")
        Image.new("RGB", (8, 8)).save(folder / "JPEGImages" / f"{image_id}.jpg")
    (folder / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n")
    (folder / "ImageSets/Main/test.txt").write_text("000003\n")
    out = prepare("voc", tmp_path, tmp_path / "out")
    assert set(out) == {"train", "test"}
    train = LabelSet.load(out["train"])
    assert train.split == "train" and train.meta["source_split"] == "trainval" and len(train) == 2
    assert LabelSet.load(out["test"]).targets[0, 5] == 1  # bus


def test_table_with_val_and_test_files(tmp_path):
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    (tmp_path / "train.csv").write_text("path,labels\na.jpg,x\nb.jpg,y|x\n")
    (tmp_path / "val.csv").write_text("path,labels\nc.jpg,y\n")
    (tmp_path / "test.csv").write_text("path,labels\nd.jpg,z\n")
    out = prepare("table", tmp_path / "train.csv", tmp_path / "out", val=tmp_path / "val.csv")
    assert set(out) == {"train", "val"}
    assert LabelSet.load(out["val"]).targets.tolist() == [[0, 1]]
    with pytest.raises(LabelSetError, match=r"test.csv: line 2: unknown label 'z'"):
        prepare("table", tmp_path / "train.csv", tmp_path / "out2", test=tmp_path / "test.csv")


def test_option_and_scheme_errors(coco, tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ordr'\] for coco; it takes \['order', 'year'\]"):
        prepare("coco", coco, tmp_path / "out", ordr="cole")
    with pytest.raises(ValueError, match="unknown data set kind 'imagenet'"):
        prepare("imagenet", coco, tmp_path / "out")
    with pytest.raises(ValueError, match="observation scheme"):
        prepare("coco", tmp_path / "nowhere", tmp_path / "out", observe="two-positives")
    with pytest.raises(LabelSetError, match=r"instances_train2014.json: not found"):
        prepare("coco", tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kind_options_lists_defaults():
    assert kind_options("coco") == {"order": "all", "year": "2014"}
    assert kind_options("cub") == {"min_certainty": 1}
    assert set(kind_options("nuswide")) == {"images", "drop_missing", "drop_unlabeled"}


def test_prepare_reads_cole_formatted_files(tmp_path):
    from mlic.data.formatted import export_formatted
    from mlic.data.labelset import LabelSet
    from mlic.data.observe import single_positive
    from mlic.data.prepare import prepare

    rng = np.random.RandomState(0)
    full = (rng.rand(12, 4) < 0.4).astype(np.int8)
    full[:, 0] = 1
    train = LabelSet(list("abcd"), [f"train2014/{i}.jpg" for i in range(12)], full, root=str(tmp_path),
                     observed=single_positive(full, 1200))
    test = LabelSet(list("abcd"), [f"val2014/{i}.jpg" for i in range(5)], full[:5], root=str(tmp_path))
    export_formatted(train, tmp_path / "cole", "train")
    export_formatted(test, tmp_path / "cole", "val")
    written = prepare("cole", tmp_path / "cole", tmp_path / "out", classes=list("abcd"))
    back = LabelSet.load(written["train"])
    np.testing.assert_array_equal(back.targets, full)
    np.testing.assert_array_equal(back.observed, train.observed)
    assert set(written) == {"train", "test"} and LabelSet.load(written["test"]).observed is None


def test_prepare_replaces_a_prepared_folder_whole_or_refuses(tmp_path):
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    (tmp_path / "train.csv").write_text("path,labels\na.jpg,x\nb.jpg,y|x\nc.jpg,y\n")
    (tmp_path / "test.csv").write_text("path,labels\nd.jpg,y\n")
    out = tmp_path / "out"
    assert set(prepare("table", tmp_path / "train.csv", out, val_fraction=0.34, test=tmp_path / "test.csv")) == \
        {"train", "val", "test"}
    assert set(prepare("table", tmp_path / "train.csv", out)) == {"train"}
    assert sorted(p.name for p in out.iterdir()) == ["train"]  # no stale val/ or test/ beside the new train/
    assert len(LabelSet.load(out / "train")) == 3 and LabelSet.load(out / "train").path(0).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary folder left
    (out / "my-notes.txt").write_text("keep me")
    with pytest.raises(LabelSetError, match=r"out: holds my-notes.txt, not only prepared splits"):
        prepare("table", tmp_path / "train.csv", out)
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "train").is_dir()


def cole_files(tmp_path, train_paths):
    from mlic.data.formatted import export_formatted

    full = np.ones((len(train_paths), 2), np.int8)
    export_formatted(LabelSet(list("ab"), train_paths, full, root=str(tmp_path)), tmp_path / "cole", "train")
    export_formatted(LabelSet(list("ab"), ["val2014/0.jpg"], full[:1], root=str(tmp_path)), tmp_path / "cole", "val")
    return tmp_path / "cole"


@pytest.mark.parametrize("name, problem", [("../../etc/passwd", "a '..' component"), ("/etc/passwd", "absolute"),
                                           ("train2014\\..\\..\\x.jpg", "a '..' component")])
def test_every_reader_refuses_image_paths_leaving_the_image_folder(tmp_path, name, problem):
    # the Cole et al. reader does not check its paths itself: prepare's shared check catches them
    root = cole_files(tmp_path, ["train2014/0.jpg", name])
    with pytest.raises(LabelSetError) as err:
        prepare("cole", root, tmp_path / "out")
    assert str(err.value) == (f"{root}: train split: row 1: image path {name!r} leaves the image folder ({problem}); "
                              "image paths must be relative paths inside it")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("classes, message", [
    (["a", "b\nc"], r"class 1 \('b\\nc'\) holds a line break"),
    (["a", ""], r"class 1 \(''\) is empty"),
    (["a", 3], r"class 1 \(3\) is not a string \(int\)"),
    (["a", "a"], r"class 'a' appears twice \(classes 0 and 1\)"),
])
def test_every_reader_refuses_bad_class_names_naming_the_data(tmp_path, classes, message):
    root = cole_files(tmp_path, ["train2014/0.jpg"])
    with pytest.raises(LabelSetError, match=message) as err:
        prepare("cole", root, tmp_path / "out", classes=classes)
    assert str(err.value).startswith(f"{root}: class 1") or str(err.value).startswith(f"{root}: class 'a'")
    assert "\n" not in str(err.value).replace("\\n", "")
