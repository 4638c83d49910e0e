"""MultiDigits written out as a COCO-format data set trains to the same mAP as the native loader."""

import json
import os

import numpy as np
from typer.testing import CliRunner

from mlic.cli import app
from mlic.data.labelset import LabelSet


def write_coco(labelset: LabelSet, json_path, image_dir, file_prefix: str, first_id: int) -> None:
    """A COCO instances file for a LabelSet: one whole-image box per positive label, ids in row order."""
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, rel in enumerate(labelset.image_paths):
        image_id = first_id + i
        name = f"{file_prefix}_{image_id:012d}.png"
        os.symlink(labelset.path(i), image_dir / name)
        images.append({"id": image_id, "file_name": name, "width": 32, "height": 32})
        for k in np.nonzero(np.asarray(labelset.targets[i]) == 1)[0]:
            annotations.append({"id": len(annotations) + 1 + first_id * 100, "image_id": image_id,
                                "category_id": int(k) + 1, "bbox": [0, 0, 32, 32], "area": 1024.0, "iscrowd": 0})
    categories = [{"id": k + 1, "name": c, "supercategory": "digit"} for k, c in enumerate(labelset.classes)]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_coco_format_matches_native(tiny_digits, tmp_path):
    splits, _, _ = tiny_digits
    runner = CliRunner()
    native = tmp_path / "native"
    splits["train"].save(native / "train")
    splits["test"].save(native / "test")
    coco = tmp_path / "coco"
    write_coco(splits["train"], coco / "annotations" / "instances_train2014.json", coco / "train2014",
               "COCO_train2014", 1)
    write_coco(splits["test"], coco / "annotations" / "instances_val2014.json", coco / "val2014",
               "COCO_val2014", 100001)
    result = runner.invoke(app, ["prepare", "coco", "--root", str(coco), "--out", str(tmp_path / "prepared")])
    assert result.exit_code == 0, result.output
    prepared = LabelSet.load(tmp_path / "prepared" / "train")
    np.testing.assert_array_equal(prepared.targets, splits["train"].targets)
    assert prepared.classes == splits["train"].classes

    args = ["--img-size", "32", "--epochs", "2", "--batch-size", "32", "--workers", "0", "--quiet", "--seed", "5"]
    a = runner.invoke(app, ["train", "--data", str(native), "--out", str(tmp_path / "run_native"), *args],
                      catch_exceptions=False)
    b = runner.invoke(app, ["train", "--data", str(tmp_path / "prepared"), "--out", str(tmp_path / "run_coco"), *args],
                      catch_exceptions=False)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ma = json.loads((tmp_path / "run_native" / "test_metrics.json").read_text())
    mb = json.loads((tmp_path / "run_coco" / "test_metrics.json").read_text())
    assert ma["mAP"] == mb["mAP"] and ma["per_class_ap"] == mb["per_class_ap"]
