import json

import numpy as np
import pytest
import torch

from mlic.data import labelset, targets
from mlic.data.labelset import ImagePaths, LabelSet, LabelSetError
from mlic.data.targets import SparseTargets
from mlic.io import atomic_npy_memmap


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
        ({"classes": ["a", "a"]}, r"class 'a' appears twice \(classes 0 and 1\)"),
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


# ---- sparse targets in a LabelSet ------------------------------------------------------------------------------------


def random_targets(n=40, k=7, known=0.3, seed=1):
    rng = np.random.RandomState(seed)
    values = rng.randint(0, 2, size=(n, k)).astype(np.int8)
    return np.where(rng.rand(n, k) < known, values, -1).astype(np.int8)


def test_sparse_labelset_round_trip_is_memory_mapped(tmp_path):
    dense, obs = random_targets(seed=2), random_targets(seed=3)
    ls = LabelSet([f"c{i}" for i in range(7)], [f"{i}.jpg" for i in range(40)], SparseTargets.from_dense(dense),
                  observed=obs)
    ls.save(tmp_path / "ls", storage="sparse")
    assert not (tmp_path / "ls" / "targets.npy").exists()
    back = LabelSet.load(tmp_path / "ls")
    assert back.sparse and isinstance(back.observed, SparseTargets)
    assert isinstance(back.targets.indptr, np.memmap) and isinstance(back.targets.indices, np.memmap)
    assert back.targets.indptr.dtype == np.int64 and back.targets.indices.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(back.targets), dense)
    np.testing.assert_array_equal(np.asarray(back.train_targets), obs)
    sub = back.subset([4, 1])
    assert sub.sparse
    np.testing.assert_array_equal(np.asarray(sub.targets), dense[[4, 1]])
    train, val = back.hold_out(0.25)
    held_out = np.sort(np.random.RandomState(1200).permutation(40)[-10:])
    np.testing.assert_array_equal(np.asarray(val.targets), dense[held_out])
    stats = back.label_stats()
    assert stats["positives_per_image"] == pytest.approx((dense == 1).sum() / 40)
    assert stats["known_percent"] == pytest.approx(100 * (dense != -1).mean())
    assert stats == LabelSet(back.classes, back.image_paths, dense).label_stats()
    # saving dense over the sparse folder leaves no stale sparse files behind
    back.save(tmp_path / "ls", storage="dense")
    assert sorted(p.name for p in (tmp_path / "ls").iterdir()) == ["labelset.json", "observed.npy", "targets.npy"]
    np.testing.assert_array_equal(LabelSet.load(tmp_path / "ls").targets, dense)


def test_auto_storage_is_dense_for_small_and_sparse_for_large(tmp_path, monkeypatch):
    ls = LabelSet([f"c{i}" for i in range(50)], [f"{i}.jpg" for i in range(400)], random_targets(400, 50, 0.05))
    ls.save(tmp_path / "small")
    assert not LabelSet.load(tmp_path / "small").sparse
    monkeypatch.setattr(targets, "SPARSE_ABOVE_BYTES", 100)
    ls.save(tmp_path / "large")
    assert LabelSet.load(tmp_path / "large").sparse
    mostly_known = LabelSet(ls.classes, ls.image_paths, random_targets(400, 50, 0.9))
    mostly_known.save(tmp_path / "dense_is_smaller")
    assert not LabelSet.load(tmp_path / "dense_is_smaller").sparse


def test_image_dataset_materialises_dense_rows_from_sparse():
    from mlic.data.images import ImageDataset

    dense = random_targets()
    ls = LabelSet([f"c{i}" for i in range(7)], [f"{i}.jpg" for i in range(40)], SparseTargets.from_dense(dense))
    data = ImageDataset(ls, transform=lambda img: img)
    _, target, index, error = data[5]  # the image does not exist: the row still comes back, with the error
    assert error and index == 5 and target.dtype == torch.int8
    np.testing.assert_array_equal(target.numpy(), dense[5])


def test_atomic_npy_memmap_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_npy_memmap(tmp_path / "a.npy", np.int32, (10,)) as out:
            out[:] = 1
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_npy_memmap(tmp_path / "a.npy", np.int32, (10,)) as out:
        out[:] = 7
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.full(10, 7))


def test_many_image_paths_go_to_a_memory_mapped_npy(tmp_path, monkeypatch):
    monkeypatch.setattr(labelset, "PATHS_IN_NPY_ABOVE", 10)
    dense = random_targets()
    paths = [f"train/{i:04x}é.jpg" for i in range(40)]
    LabelSet([f"c{i}" for i in range(7)], paths, SparseTargets.from_dense(dense)).save(tmp_path / "ls")
    back = LabelSet.load(tmp_path / "ls")
    assert isinstance(back.image_paths, ImagePaths) and isinstance(back.image_paths.encoded, np.memmap)
    assert back.image_paths == paths and list(back.image_paths) == paths and back.image_paths[3] == paths[3]
    assert back.image_paths[2:5] == paths[2:5] and back.path(39).name == "0027é.jpg"
    sub = back.subset([5, 2])
    assert isinstance(sub.image_paths, ImagePaths) and sub.image_paths == [paths[5], paths[2]]
    sub.save(tmp_path / "small")  # 2 paths: back into the JSON header, and no stale npy
    assert not (tmp_path / "small" / "image_paths.npy").exists()
    assert LabelSet.load(tmp_path / "small").image_paths == [paths[5], paths[2]]


@pytest.mark.parametrize("classes, message", [
    (["a", "b\nc"], r"class 1 \('b\\nc'\) holds a line break or another control character"),
    (["a", "b\tc"], r"class 1 \('b\\tc'\) holds a line break"),
    (["a", ""], r"class 1 \(''\) is empty"),
    (["a", "  "], r"class 1 \('  '\) is empty"),
    (["a", 3], r"class 1 \(3\) is not a string \(int\)"),
    (["a", None], r"class 1 \(None\) is not a string \(NoneType\)"),
    (["b", "b"], r"class 'b' appears twice \(classes 0 and 1\)"),
])
def test_class_names_must_be_distinct_non_empty_one_line_strings(classes, message, tmp_path):
    with pytest.raises(labelset.LabelSetContentError, match=message):
        LabelSet(classes, ["x", "y"], np.zeros((2, 2), np.int8))
    with pytest.raises(LabelSetError, match="^names.txt: " + message):
        labelset.check_class_names(classes, "names.txt")
    # a hand-edited header: the message names the file
    make(n=2, k=2).save(tmp_path / "ls")
    header = json.loads((tmp_path / "ls" / "labelset.json").read_text())
    (tmp_path / "ls" / "labelset.json").write_text(json.dumps(header | {"classes": classes}))
    with pytest.raises(LabelSetError) as err:
        LabelSet.load(tmp_path / "ls")
    assert str(err.value).startswith(f"{tmp_path / 'ls' / 'labelset.json'}: class ")


def test_numpy_strings_are_strings():
    ls = LabelSet(np.array(["a", "b"]), ["x"], np.zeros((1, 2), np.int8))
    assert ls.classes == ["a", "b"] and all(type(c) is str for c in ls.classes)


ESCAPING = {"../x.jpg": "a '..' component", "a/../../x.jpg": "a '..' component", "a/..": "a '..' component",
            "..": "a '..' component", "..\\x.jpg": "a '..' component", "/etc/passwd": "absolute",
            "\\\\server\\share\\x.jpg": "absolute", "C:\\x.jpg": "absolute", "c:x.jpg": "absolute", "": "empty"}
INSIDE = ["x.jpg", "a/b/x.jpg", "./x.jpg", "a..b/x.jpg", "..a/x.jpg", "a/x..", "é:x.jpg", ":b.jpg", "a\\b.jpg"]


def test_image_paths_leaving_the_root_are_refused_on_save_and_on_load(tmp_path, monkeypatch):
    for name, problem in ESCAPING.items():
        assert labelset.image_path_problem(name) == problem, name
    assert [labelset.image_path_problem(name) for name in INSIDE] == [None] * len(INSIDE)
    # the vectorised check of ImagePaths (large sets) applies the same rule
    every = list(ESCAPING) + INSIDE
    refused = labelset._escaping_rows(ImagePaths.from_strings(every).encoded).tolist()
    assert refused == list(range(len(ESCAPING)))
    for name, problem in ESCAPING.items():
        for paths in (["ok.jpg", name], ImagePaths.from_strings(["ok.jpg", name])):
            ls = LabelSet(["a"], paths, np.zeros((2, 1), np.int8), root=str(tmp_path))
            with pytest.raises(LabelSetError) as err:
                ls.save(tmp_path / "ls")
            assert str(err.value) == (f"{tmp_path / 'ls'}: image_paths: row 1: image path {name!r} leaves the image "
                                      f"folder ({problem}); image paths must be relative paths inside it")
    make().save(tmp_path / "ok")
    header = json.loads((tmp_path / "ok" / "labelset.json").read_text())
    header["image_paths"][3] = "../../etc/passwd"
    (tmp_path / "ok" / "labelset.json").write_text(json.dumps(header))
    with pytest.raises(LabelSetError, match=r"labelset.json: field 'image_paths': row 3: image path "
                                            r"'../../etc/passwd' leaves the image folder"):
        LabelSet.load(tmp_path / "ok")
