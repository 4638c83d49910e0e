"""Table reader: CSV/TSV with a labels column or one column per class, JSON lines, folder + JSON mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mlic.data.labelset import LabelSetError
from mlic.data.table import read_table


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / name, quality=90)
    return folder


def test_csv_labels_column(images):
    (images / "labels.csv").write_text("path,labels\na.jpg,dog|cat\nb.jpg,\n\nsub/c.jpg, bird | dog \n")
    ls = read_table(images / "labels.csv", split="train")
    assert ls.classes == ["bird", "cat", "dog"]  # sorted union
    assert ls.image_paths == ["a.jpg", "b.jpg", "sub/c.jpg"] and ls.root == str(images) and ls.split == "train"
    np.testing.assert_array_equal(ls.targets, [[0, 1, 1], [0, 0, 0], [1, 0, 1]])
    assert all(ls.path(i).is_file() for i in range(len(ls)))


def test_given_class_list_sets_order_and_rejects_strangers(images):
    (images / "labels.csv").write_text("labels,path\ndog,a.jpg\n,b.jpg\n")
    ls = read_table(images / "labels.csv", classes=["dog", "cat", "fish"])
    np.testing.assert_array_equal(ls.targets, [[1, 0, 0], [0, 0, 0]])
    (images / "labels.csv").write_text("path,labels\na.jpg,dog\nb.jpg,cow|dog\n")
    with pytest.raises(LabelSetError, match=r"labels.csv: line 3: unknown label 'cow' \(not in the class list\)"):
        read_table(images / "labels.csv", classes=["dog", "cat"])


def test_tsv_one_column_per_class(images, tmp_path):
    (tmp_path / "t.tsv").write_text("path\tcat\tdog\na.jpg\t1\t-1\nb.jpg\t0\t1\n")
    ls = read_table(tmp_path / "t.tsv", images=images)
    assert ls.classes == ["cat", "dog"] and ls.root == str(images)
    np.testing.assert_array_equal(ls.targets, [[1, -1], [0, 1]])


def test_jsonl_both_layouts(images):
    (images / "l.jsonl").write_text('{"path": "a.jpg", "labels": ["x", "y"]}\n{"path": "b.jpg", "labels": "y"}\n')
    np.testing.assert_array_equal(read_table(images / "l.jsonl").targets, [[1, 1], [0, 1]])
    (images / "c.jsonl").write_text('{"path": "a.jpg", "x": 1, "y": -1}\n\n{"path": "b.jpg", "y": 0, "x": 0}\n')
    ls = read_table(images / "c.jsonl")
    assert ls.classes == ["x", "y"]
    np.testing.assert_array_equal(ls.targets, [[1, -1], [0, 0]])


def test_folder_plus_json_mapping(images):
    (images / "labels.json").write_text(json.dumps({"a.jpg": ["cat", "dog"], "sub/c.jpg": [], "b.jpg": ["dog"]}))
    ls = read_table(images / "labels.json")
    assert ls.image_paths == ["a.jpg", "sub/c.jpg", "b.jpg"] and ls.classes == ["cat", "dog"]
    np.testing.assert_array_equal(ls.targets, [[1, 1], [0, 0], [0, 1]])


@pytest.mark.parametrize("name, text, message", [
    ("v.csv", "path,cat,dog\na.jpg,1,0\nb.jpg,yes,1\n", r"v.csv: line 3: column 'cat': value 'yes' is not 1, 0 or -1"),
    ("v.csv", "path,cat,dog\na.jpg,1,\n", r"line 2: column 'dog': value '' is not 1, 0 or -1"),
    ("m.csv", "image,labels\na.jpg,cat\n", r"m.csv: line 1: missing column 'path'"),
    ("d.csv", "path,labels\na.jpg,cat\nb.jpg,dog\na.jpg,dog\n",
     r"d.csv: line 4: duplicate path 'a.jpg' \(first on line 2\)"),
    ("w.csv", "path,cat,dog\na.jpg,1,0\nb.jpg,1\n", r"w.csv: line 3: 2 fields, the header has 3"),
    ("w.tsv", "path\tlabels\na.jpg\tcat\tdog\n", r"w.tsv: line 2: 3 fields, the header has 2"),
    ("e.csv", "path,labels\n,cat\n", r"e.csv: line 2: field 'path' is empty"),
    ("h.csv", "path,cat,cat\na.jpg,1,1\n", r"h.csv: line 1: duplicate columns \['cat'\]"),
    ("j.jsonl", '{"path": "a.jpg", "x": 1}\n{"path": "b.jpg", "x": 2}\n', r"j.jsonl: line 2: field 'x': value 2"),
    ("j.jsonl", '{"path": "a.jpg", "x": 1}\n{"path": "b.jpg"}\n', r"j.jsonl: line 2: missing class fields \['x'\]"),
    ("j.jsonl", '{"path": "a.jpg", "labels": []}\n{"labels": ["x"]}\n', r"j.jsonl: line 2: missing field 'path'"),
    ("j.jsonl", '{"path": "a.jpg", "labels": []}\n{"path": "b.jpg", \n', r"j.jsonl: line 2: not valid JSON"),
    ("k.json", '{"a.jpg": ["x"], "b.jpg": "x", "a.jpg": []}', r"k.json: duplicate path 'a.jpg'"),
    ("k.json", '{"a.jpg": ["x"], "b.jpg": [1]}', r"k.json: key 'b.jpg': field 'b.jpg' must be a list of class names"),
    ("k.json", '["a.jpg"]', r"k.json: expected a JSON object mapping image path"),
    ("k.txt", "a.jpg cat\n", r"k.txt: unknown table format '.txt'"),
])
def test_malformed_tables_one_line_with_line_number(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(LabelSetError, match=message) as err:
        read_table(tmp_path / name)
    assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, text, line", [
    ("t.csv", "path,labels\na.jpg,cat\n{image},dog\n", 3),
    ("t.tsv", "path\tcat\na.jpg\t1\n{image}\t0\n", 3),
    ("t.jsonl", '{{"path": "a.jpg", "labels": ["cat"]}}\n{{"path": {quoted}, "labels": []}}\n', 2),
])
@pytest.mark.parametrize("image, problem", [
    ("../../etc/passwd", "a '..' component"), ("sub/../../x.jpg", "a '..' component"),
    ("..\\x.jpg", "a '..' component"), ("/etc/passwd", "absolute"),
])
def test_image_paths_leaving_the_image_folder_are_refused(images, name, text, line, image, problem):
    table = images / name
    table.write_text(text.format(image=image, quoted=json.dumps(image)))
    with pytest.raises(LabelSetError) as err:
        read_table(table)
    assert str(err.value) == (f"{table}: line {line}: image path {image!r} leaves the image folder {images} "
                              f"({problem}); give paths relative to it (option images= sets it)")


def test_mapping_keys_leaving_the_image_folder_are_refused(images):
    (images / "m.json").write_text(json.dumps({"a.jpg": ["cat"], "../secret.jpg": []}))
    with pytest.raises(LabelSetError, match=r"m.json: key '../secret.jpg': image path '../secret.jpg' leaves"):
        read_table(images / "m.json")


def test_absolute_paths_inside_the_image_folder_are_stored_relative(images, tmp_path):
    (tmp_path / "link").symlink_to(images)  # the folder given through a link, the paths written with its target
    (images / "t.csv").write_text(f"path,labels\n{images / 'a.jpg'},cat\nsub/c.jpg,dog\n")
    ls = read_table(images / "t.csv", images=tmp_path / "link")
    assert ls.image_paths == ["a.jpg", "sub/c.jpg"] and ls.path(0).is_file()
    (images / "t.csv").write_text(f"path,labels\n{images / 'a.jpg'},cat\na.jpg,dog\n")
    with pytest.raises(LabelSetError, match=r"t.csv: line 3: duplicate path 'a.jpg' \(first on line 2\)"):
        read_table(images / "t.csv")


@pytest.mark.parametrize("name, text, classes, message", [
    ("h.csv", "path,,cat\na.jpg,1,0\n", None, r"h.csv: line 1: class 0 \(''\) is empty"),
    ("h.csv", 'path,"ca\nt",dog\na.jpg,1,0\n', None, r"h.csv: line 1: class 0 \('ca\\nt'\) holds a line break"),
    ("l.csv", 'path,labels\na.jpg,"x|ca\nt"\n', None, r"l.csv: line 3: label 'ca\\nt' holds a line break"),
    ("j.jsonl", '{"path": "a.jpg", "c\\u0000t": 1}\n', None, r"j.jsonl: line 1: class 0 \('c\\x00t'\) holds"),
    ("j.jsonl", '{"path": "a.jpg", "labels": ["c\\nt"]}\n', None, r"j.jsonl: line 1: label 'c\\nt' holds a line"),
    ("m.json", '{"a.jpg": ["x\\ny"]}', None, r"m.json: key 'a.jpg': label 'x\\ny' holds a line break"),
    ("g.csv", "path,labels\na.jpg,x\n", ["x", ""],
     r"g.csv: the class list given \(option classes\): class 1 \(''\) is empty"),
    ("g.csv", "path,labels\na.jpg,x\n", ["x", None], r"class 1 \(None\) is not a string \(NoneType\)"),
    ("g.csv", "path,labels\na.jpg,x\n", ["x", "x"], r"g.csv: the class list given \(option classes\): class 'x' "
                                                    r"appears twice \(classes 0 and 1\)"),
])
def test_class_names_must_be_distinct_non_empty_one_line_strings(tmp_path, name, text, classes, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(LabelSetError, match=message) as err:
        read_table(tmp_path / name, classes=classes)
    assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)


def test_a_class_list_of_numbers_names_the_labels_written_as_those_numbers(tmp_path):
    (tmp_path / "n.csv").write_text("path,labels\na.jpg,2\nb.jpg,1|2\n")
    ls = read_table(tmp_path / "n.csv", classes=[2, 1])  # what --option classes=[2,1] gives (YAML numbers)
    assert ls.classes == ["2", "1"] and ls.targets.tolist() == [[1, 0], [1, 1]]
