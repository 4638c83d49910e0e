"""Pascal VOC reader on a tiny VOCdevkit/VOC2007 tree: XML annotations, ImageSets lists, real JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic.data.labelset import LabelSetError
from mlic.data.voc import VOC_CLASSES, find_voc, read_voc

C = {name: j for j, name in enumerate(VOC_CLASSES)}
# image id -> objects (class, difficult)
OBJECTS = {
    "000005": [("chair", 0), ("chair", 1), ("diningtable", 1)],  # chair: plain + difficult -> positive
    "000007": [("car", 0)],
    "000009": [("horse", 0), ("person", 0), ("person", 1)],
    "000012": [("dog", 1)],  # only difficult objects
}
SPLITS = {"trainval": ["000005", "000007", "000009"], "test": ["000012"]}


def voc_xml(image_id: str, objects) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
             "<size><width>32</width><height>24</height><depth>3</depth></size>"]
    for name, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
                     f"<ymax>9</ymax></bndbox></object>")
    return "\n".join(parts) + "</annotation>\n"


def expected_labels(objects, difficult_value: int) -> np.ndarray:
    row = np.zeros(20, np.int8)
    for name, difficult in objects:
        if difficult and row[C[name]] != 1:
            row[C[name]] = difficult_value
    for name, difficult in objects:
        if not difficult:
            row[C[name]] = 1
    return row


def write_voc(root: Path) -> Path:
    folder = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in OBJECTS.items():
        (folder / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, objects))
        Image.new("RGB", (32, 24), (int(image_id) * 9 % 255, 90, 30)).save(folder / "JPEGImages" / f"{image_id}.jpg")
    for split, ids in SPLITS.items():
        (folder / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for name in VOC_CLASSES:
            lines = []
            for i in ids:
                value = {1: " 1", 0: "-1", -1: " 0"}[int(expected_labels(OBJECTS[i], -1)[C[name]])]
                lines.append(f"{i} {value}\n")  # the devkit pads positives to two characters
            (folder / "ImageSets/Main" / f"{name}_{split}.txt").write_text("".join(lines))
    return folder


@pytest.mark.parametrize("source", ["xml", "lists"])
@pytest.mark.parametrize("difficult, value", [("unknown", -1), ("positive", 1), ("negative", 0)])
def test_labels_entry_by_entry(tmp_path, source, difficult, value):
    folder = write_voc(tmp_path)
    ls = read_voc(tmp_path, "trainval", source=source, difficult=difficult)
    assert ls.classes == list(VOC_CLASSES) and ls.root == str(folder)
    assert ls.image_paths == [f"JPEGImages/{i}.jpg" for i in SPLITS["trainval"]]
    assert all(ls.path(i).is_file() for i in range(len(ls)))
    expected = np.stack([expected_labels(OBJECTS[i], value) for i in SPLITS["trainval"]])
    np.testing.assert_array_equal(ls.targets, expected)
    # the hand-written facts behind `expected`
    assert ls.targets[0, C["chair"]] == 1 and ls.targets[0, C["diningtable"]] == value
    assert ls.targets[2, C["person"]] == 1 and ls.targets[1, C["car"]] == 1 and ls.targets[1].sum() == 1
    test = read_voc(folder, "test", source=source, difficult=difficult)
    assert test.targets[0, C["dog"]] == value and np.count_nonzero(test.targets) == (value != 0)


def test_find_voc_locations(tmp_path):
    folder = write_voc(tmp_path)
    assert find_voc(tmp_path) == folder == find_voc(tmp_path / "VOCdevkit", "2007") == find_voc(folder)
    with pytest.raises(LabelSetError, match="no VOC folder found"):
        find_voc(tmp_path, "2012")


def test_missing_difficult_tag_means_not_difficult(tmp_path):
    folder = write_voc(tmp_path)
    xml = folder / "Annotations" / "000007.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", ""))
    assert read_voc(folder, "trainval").targets[1, C["car"]] == 1


def test_malformed_xml(tmp_path):
    folder = write_voc(tmp_path)
    xml = folder / "Annotations" / "000009.xml"
    xml.write_text(voc_xml("000009", OBJECTS["000009"]).replace("person", "persn", 1))
    with pytest.raises(LabelSetError, match=r"000009.xml: field 'object\[1\]/name': 'persn' is not one of"):
        read_voc(folder, "trainval")
    xml.write_text("<annotation><object><name>dog</name>")
    with pytest.raises(LabelSetError, match=r"000009.xml: not valid XML \(line 1"):
        read_voc(folder, "trainval")
    xml.write_text(voc_xml("000009", [("dog", "yes")]))
    with pytest.raises(LabelSetError, match=r"000009.xml: field 'object\[0\]/difficult': 'yes'"):
        read_voc(folder, "trainval")
    xml.unlink()
    with pytest.raises(LabelSetError, match=r"000009.xml: not found"):
        read_voc(folder, "trainval")


def test_malformed_lists(tmp_path):
    folder = write_voc(tmp_path)
    lst = folder / "ImageSets/Main/cat_trainval.txt"
    lst.write_text("000005 -1\n000007 2\n000009 -1\n")
    with pytest.raises(LabelSetError, match=r"cat_trainval.txt: line 2: expected '<image id> <1\|-1\|0>'"):
        read_voc(folder, "trainval", source="lists")
    lst.write_text("000005 -1\n000009 -1\n")
    with pytest.raises(LabelSetError, match=r"cat_trainval.txt: image '000007' is missing"):
        read_voc(folder, "trainval", source="lists")
    (folder / "ImageSets/Main/trainval.txt").write_text("000005\n000005\n")
    with pytest.raises(LabelSetError, match=r"trainval.txt: line 2: image id '000005' listed twice"):
        read_voc(folder, "trainval")
    with pytest.raises(LabelSetError, match=r"val.txt: not found"):
        read_voc(folder, "val")
