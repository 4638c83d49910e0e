import numpy as np
import pytest
from typer.testing import CliRunner

from mlic.cli import app
from mlic.data import openimages
from mlic.data.labelset import LabelSet, LabelSetError
from mlic.data.openimages import read_openimages
from mlic.data.prepare import prepare

CLASSES = [("/m/01", "Cat"), ("/m/02", "Dog"), ("/m/03", "Cake, baked"), ("/m/04", "Mouse"), ("/m/05", "Mouse")]
HEADER = "ImageID,Source,LabelName,Confidence\n"
# rows grouped by ImageID, ascending, labels in no particular order, one repeated row that agrees
TRAIN = [("000a", "/m/03", 1), ("000a", "/m/01", 0), ("000a", "/m/05", 1), ("000a", "/m/03", 1),
         ("0b1f", "/m/02", 1), ("1c00", "/m/04", 0), ("1c00", "/m/02", 0), ("1c00", "/m/01", 1),
         ("ffee", "/m/05", 0)]
VAL = [("0001", "/m/01", 1), ("0002", "/m/02", 0), ("0002", "/m/04", 1)]
TEST = [("00aa", "/m/05", 1)]


def write_csv(path, rows, header=HEADER):
    path.write_text(header + "".join(f"{i},verification,{label},{c}\n" for i, label, c in rows))


def make_tree(tmp_path, version="oidv6", train=TRAIN):
    root = tmp_path / "OI"
    root.mkdir()
    (root / f"{version}-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f'{label},"{name}"\n' for label, name in CLASSES))
    val_name = "oidv7-val" if version == "oidv7" else "validation"
    test_name = "oidv7-test" if version == "oidv7" else "test"
    write_csv(root / f"{version}-train-annotations-human-imagelabels.csv", train)
    write_csv(root / f"{val_name}-annotations-human-imagelabels.csv", VAL)
    write_csv(root / f"{test_name}-annotations-human-imagelabels.csv", TEST)
    (root / "train").mkdir()
    for image_id in ("000a", "1c00"):
        (root / "train" / f"{image_id}.jpg").write_bytes(b"")
    return root


def expected(rows, class_ids):
    """{image id: {class index: value}} straight from the rows."""
    out = {}
    for image_id, label, confidence in rows:
        if label in class_ids:
            out.setdefault(image_id, {})[class_ids[label]] = confidence
    return out


def check_entries(ls, rows, class_ids, folder):
    truth = expected(rows, class_ids)
    assert ls.image_paths == [f"{folder}/{i}.jpg" for i in sorted(truth)]
    dense = np.asarray(ls.targets)
    for r, image_id in enumerate(sorted(truth)):
        for k in range(ls.num_classes):
            assert dense[r, k] == truth[image_id].get(k, -1), (image_id, k)
            assert ls.targets[r][k] == dense[r, k]


@pytest.mark.parametrize("version, block", [("oidv6", 1 << 20), ("oidv7", 48)])
def test_reads_every_entry(tmp_path, monkeypatch, version, block):
    monkeypatch.setattr(openimages, "BLOCK_BYTES", block)  # 48 bytes: images straddle blocks
    sets = read_openimages(make_tree(tmp_path, version), progress=False)
    assert sorted(sets) == ["test", "train", "val"]
    train = sets["train"]
    assert train.classes == ["Cat", "Dog", "Cake, baked", "Mouse (/m/04)", "Mouse (/m/05)"]
    assert train.meta["label_names"] == [label for label, _ in CLASSES]
    assert train.sparse and train.targets.indices.dtype == np.int32
    ids = {label: k for k, (label, _) in enumerate(CLASSES)}
    check_entries(train, TRAIN, ids, "train")
    check_entries(sets["val"], VAL, ids, "validation")
    check_entries(sets["test"], TEST, ids, "test")
    assert train.meta["rows"] == 9 and train.meta["duplicates"] == 1 and train.meta["missing_images"] == 2
    assert sets["val"].meta["missing_images"] == 2  # no validation/ folder at all
    for r in range(len(train)):  # class ids ascending within each row
        row = train.targets.indices[train.targets.indptr[r]:train.targets.indptr[r + 1]]
        assert (np.diff(row) > 0).all()


def test_trainable_list_and_drop_missing(tmp_path):
    root = make_tree(tmp_path)
    (root / "trainable.txt").write_text("/m/04\n/m/01\n/m/03\n")
    sets = read_openimages(root, trainable=root / "trainable.txt", drop_missing=True, progress=False)
    train = sets["train"]
    assert train.classes == ["Mouse", "Cat", "Cake, baked"]  # no shared DisplayName left
    assert train.meta["skipped_untrainable"] == 4 and train.meta["dropped_missing"] == 2
    rows = [r for r in TRAIN if r[0] in ("000a", "1c00")]
    check_entries(train, rows, {"/m/04": 0, "/m/01": 1, "/m/03": 2}, "train")
    assert len(sets["val"]) == 0  # no validation images on disk


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("000a", "/m/99", 1)], r"line 2: LabelName /m/99 is not in the class descriptions"),
        ([("000a", "/m/01", 1), ("000a", "/m/02", 0.7)], r"line 3: Confidence '0.7' is neither 0 nor 1"),
        ([("000a", "/m/01", 1), ("000a", "/m/02", 1), ("000a", "/m/01", 0)],
         r"line 4: image 000a class /m/01: Confidence differs from line 2"),
        ([("000b", "/m/01", 1), ("000a", "/m/01", 1)], r"line 3: ImageID 000a after 000b: .*LC_ALL=C sort"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    root = make_tree(tmp_path, train=rows)
    with pytest.raises(LabelSetError, match=r"oidv6-train-annotations-human-imagelabels.csv: " + message):
        read_openimages(root, progress=False)


def test_windows_line_ends_bom_and_no_final_newline(tmp_path):
    root = make_tree(tmp_path)
    train = root / "oidv6-train-annotations-human-imagelabels.csv"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes().replace(b"\n", b"\r\n").rstrip(b"\r\n"))
    sets = read_openimages(root, progress=False)
    check_entries(sets["train"], TRAIN, {label: k for k, (label, _) in enumerate(CLASSES)}, "train")


def test_bad_layout(tmp_path):
    with pytest.raises(LabelSetError, match="no oidv6-train-annotations-human-imagelabels.csv"):
        read_openimages(tmp_path, progress=False)
    root = make_tree(tmp_path)
    train = root / "oidv6-train-annotations-human-imagelabels.csv"
    train.write_text(HEADER + "000a,verification,/m/01\n")
    with pytest.raises(LabelSetError, match="line 2: expected 4 comma-separated fields"):
        read_openimages(root, progress=False)
    train.write_text("ImageID,LabelName\n")
    with pytest.raises(LabelSetError, match="line 1 must be the header"):
        read_openimages(root, progress=False)
    (root / "trainable.txt").write_text("/m/01\n/m/77\n")
    with pytest.raises(LabelSetError, match="trainable.txt: line 2: LabelName /m/77"):
        read_openimages(root, trainable=root / "trainable.txt", progress=False)


def test_prepare_and_cli(tmp_path):
    root = make_tree(tmp_path)
    written = prepare("openimages", root, tmp_path / "oi", progress=False)
    assert sorted(written) == ["test", "train", "val"]
    back = LabelSet.load(written["train"])
    ids = {label: k for k, (label, _) in enumerate(CLASSES)}
    check_entries(back, TRAIN, ids, "train")
    assert back.path(0) == (root / "train" / "000a.jpg").resolve()
    result = CliRunner().invoke(app, ["prepare", "openimages", "--root", str(root), "--out", str(tmp_path / "cli"),
                                      "--option", "progress=false"])
    assert result.exit_code == 0, result.output
    assert "train       4 images  5 classes" in result.output
    (tmp_path / "bad").mkdir()
    bad = make_tree(tmp_path / "bad", train=[("000a", "/m/99", 1)])
    result = CliRunner().invoke(app, ["prepare", "openimages", "--root", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "LabelName /m/99" in result.output and "Traceback" not in result.output
