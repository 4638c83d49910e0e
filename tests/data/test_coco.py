"""COCO reader on a tiny COCO 2014 layout: annotations/instances_*.json plus real JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic.data.coco import read_coco, read_coco_splits
from mlic.data.labelset import LabelSetError

# categories listed out of id order on purpose: "cole" keeps the list order, "all" sorts by id
CATEGORIES = [{"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
# image id -> category ids of its annotations (9 has a crowd one, 42 has none)
ANNOTATED = {9: [1, 1, 3], 10: [90], 100: [3], 25: [1, 90], 42: []}
CROWD = {(9, 3)}


def write_coco(root: Path, split: str = "train", images: dict[int, list[int]] = ANNOTATED, categories=CATEGORIES):
    folder = root / f"{split}2014"
    folder.mkdir(parents=True, exist_ok=True)
    image_entries, annotations = [], []
    for image_id, cats in images.items():
        name = f"COCO_{split}2014_{image_id:012d}.jpg"
        Image.new("RGB", (32, 24), (image_id % 255, 80, 160)).save(folder / name, quality=90)
        image_entries.append({"id": image_id, "file_name": name, "width": 32, "height": 24})
        for cat in cats:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "iscrowd": int((image_id, cat) in CROWD), "bbox": [0, 0, 4, 4], "area": 16.0})
    data = {"info": {}, "licenses": [], "images": image_entries, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}2014.json"
    path.write_text(json.dumps(data))
    return path


def test_all_order_keeps_every_image_sorted_by_id(tmp_path):
    path = write_coco(tmp_path)
    ls = read_coco(path, tmp_path / "train2014", order="all", root=tmp_path, split="train")
    assert ls.classes == ["person", "car", "toothbrush"]  # category id order 1, 3, 90
    assert ls.meta["category_ids"] == [1, 3, 90]
    assert ls.meta["image_ids"] == [9, 10, 25, 42, 100]
    assert ls.image_paths[0] == "train2014/COCO_train2014_000000000009.jpg"
    expected = np.array([
        [1, 1, 0],  # 9: person x2, car (crowd counts)
        [0, 0, 1],  # 10
        [1, 0, 1],  # 25
        [0, 0, 0],  # 42: no annotation, all negative
        [0, 1, 0],  # 100
    ])
    np.testing.assert_array_equal(ls.targets, expected)
    assert ls.targets.dtype == np.int8
    assert ls.meta["images_without_annotations"] == 1
    assert all(ls.path(i).is_file() for i in range(len(ls)))


def test_cole_order_drops_empty_images_and_sorts_ids_as_strings(tmp_path):
    path = write_coco(tmp_path)
    ls = read_coco(path, tmp_path / "train2014", order="cole", root=tmp_path)
    assert ls.meta["image_ids"] == [10, 100, 25, 9]  # "10" < "100" < "25" < "9"
    assert ls.classes == ["car", "person", "toothbrush"]  # the JSON's list order
    np.testing.assert_array_equal(ls.targets, [[0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0]])
    assert ls.image_paths[1] == "train2014/COCO_train2014_000000000100.jpg"


def test_any_coco_format_file_and_default_root(tmp_path):
    path = write_coco(tmp_path, images={5: [90], 6: [3]}, categories=[{"id": 3, "name": "a"}, {"id": 90, "name": "b"}])
    ls = read_coco(path, tmp_path / "train2014")
    assert ls.root == str(tmp_path / "train2014") and ls.image_paths[0] == "COCO_train2014_000000000005.jpg"
    np.testing.assert_array_equal(ls.targets, [[0, 1], [1, 0]])


def test_splits_read_together(tmp_path):
    write_coco(tmp_path, "train")
    write_coco(tmp_path, "val", images={7: [3]})
    sets = read_coco_splits(tmp_path)
    assert list(sets) == ["train", "val"] and len(sets["train"]) == 5 and len(sets["val"]) == 1
    assert sets["val"].image_paths == ["val2014/COCO_val2014_000000000007.jpg"]
    assert sets["val"].targets.tolist() == [[0, 1, 0]]


def test_splits_must_share_categories(tmp_path):
    write_coco(tmp_path, "train")
    write_coco(tmp_path, "val", images={7: [3]}, categories=CATEGORIES[:2])
    with pytest.raises(LabelSetError, match=r"instances_val2014.json: field 'categories' differs"):
        read_coco_splits(tmp_path)


def corrupt(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("categories"), "field 'categories' is missing"),
    (lambda d: d.__setitem__("images", {}), "field 'images' is not a list"),
    (lambda d: d["annotations"][2].__setitem__("category_id", 77), r"annotations\[2\]\.category_id': category 77"),
    (lambda d: d["annotations"][0].pop("image_id"), r"annotations\[0\]\.image_id' is missing"),
    (lambda d: d["annotations"][1].__setitem__("image_id", 5), r"annotations\[1\]\.image_id': image 5 is not"),
    (lambda d: d["images"][3].pop("file_name"), r"images\[3\]\.file_name' is missing"),
    (lambda d: d["categories"][1].__setitem__("id", 3), r"categories\[1\]\.id': category id 3 appears twice"),
    (lambda d: d["categories"][2].__setitem__("name", "car"), r"categories\[2\]\.name': category name 'car'"),
    (lambda d: d["images"][1].__setitem__("id", "10"), r"images\[1\]\.id' is missing or not an integer"),
    (lambda d: d["categories"][1].__setitem__("name", "per\nson"),
     r"categories\[1\]\.name': class 'per\\nson' holds a line break"),
    (lambda d: d["categories"][0].__setitem__("name", "  "), r"categories\[0\]\.name': class '  ' is empty"),
    (lambda d: d["categories"][2].__setitem__("name", 7), r"categories\[2\]\.name' is missing or not a string"),
])
def test_malformed_file_one_line_naming_file_and_field(tmp_path, change, message):
    path = write_coco(tmp_path)
    corrupt(path, change)
    with pytest.raises(LabelSetError, match=message) as err:
        read_coco(path, tmp_path / "train2014")
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "instances_train2014.json"
    path.write_text('{"images": [}')
    with pytest.raises(LabelSetError, match=r"instances_train2014.json: not valid JSON \(line 1 column 13"):
        read_coco(path, tmp_path)
    with pytest.raises(LabelSetError, match="nope.json: not found"):
        read_coco(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../x.jpg", "C:\\x.jpg", "..\\x.jpg"])
def test_file_names_leaving_the_image_folder_are_refused(tmp_path, name):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["images"][1]["file_name"] = name
    path.write_text(json.dumps(data))
    with pytest.raises(LabelSetError, match=r"instances_train2014.json: field 'images\[1\].file_name': .* leaves"):
        read_coco(path, tmp_path / "train2014")


@pytest.mark.parametrize("spelling", ["{}", "./{}", ".//{}"])  # one file however it is written
def test_two_image_ids_sharing_one_file_are_refused(tmp_path, spelling):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    twin = spelling.format(data["images"][0]["file_name"])  # the file of image 9 ...
    data["images"][3]["file_name"] = twin  # ... named by image 25 too
    path.write_text(json.dumps(data))
    with pytest.raises(LabelSetError) as err:
        read_coco(path, tmp_path / "train2014")
    assert str(err.value) == (f"{path}: field 'images[3].file_name': images 9 and 25 share the file name {twin!r}; "
                              "each image id needs its own file")
