"""Read a user's own labels from a table: CSV, TSV, JSON lines, or a JSON mapping.

Layouts (the first row of a CSV/TSV is a header; the path column is called ``path``):

- ``path,labels`` with the labels of an image joined by ``|`` (``cat|dog``; empty = no label).
  Absent labels are negatives. Classes are the sorted union of all labels, or the list given.
- ``path,<class 1>,<class 2>,...``: one column per class holding 1, 0 or -1 (unknown).
- JSON lines: one object per line, ``{"path": "a.jpg", "labels": ["cat", "dog"]}`` (or ``"cat|dog"``)
  or ``{"path": "a.jpg", "cat": 1, "dog": -1}``.
- Folder plus JSON mapping: a ``.json`` file holding ``{"a.jpg": ["cat", "dog"], "b.jpg": []}``.

Image paths are relative to ``images`` (default: the table's folder) and must stay inside it: a path
that is absolute outside that folder or has a ``..`` component is refused (an absolute path inside it is
stored relative). The rule is the one every reader shares, :func:`mlic.data.labelset.image_path_problem`;
it is judged on the text, so symbolic links inside the folder are followed as they are. Class names must be
non-empty strings on one line (:func:`mlic.data.labelset.check_class_names`). Every problem is reported as
one line naming the file, the line (or key) and the field.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from pathlib import Path

import numpy as np

from mlic.data.labelset import LabelSet, LabelSetError, check_class_names, class_name_problem, image_path_problem
from mlic.registry import register_reader

LABEL_SEPARATOR = "|"
_VALUES = {"1": 1, "0": 0, "-1": -1}
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


def read_lines(path: str | os.PathLike, hint: str = "") -> list[str]:
    """The lines of a text annotation file, without line ends.

    Raises:
        LabelSetError: the file is missing or not UTF-8 text; ``hint`` is appended to say what to do.
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise LabelSetError(f"{path}: not found{suffix}") from None
    except IsADirectoryError:
        raise LabelSetError(f"{path}: is a folder, expected a text file{suffix}") from None
    except UnicodeDecodeError as e:
        raise LabelSetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_table(path: str | os.PathLike, images: str | os.PathLike | None = None, classes: list[str] | None = None,
               split: str = "", fmt: str | None = None) -> LabelSet:
    """Read a label table into a LabelSet.

    Args:
        path: ``.csv``, ``.tsv``, ``.jsonl`` (JSON lines) or ``.json`` (mapping path -> labels).
        images: folder the image paths are relative to; default the table's folder.
        classes: class names in the order wanted. With a ``labels`` layout, labels outside this list are
            an error; with per-class columns, the columns must be exactly these.
        split: split name stored in the LabelSet.
        fmt: "csv", "tsv", "jsonl" or "json" to override the guess from the suffix.

    Returns:
        LabelSet with targets int8 (N, K) in file order.

    Raises:
        LabelSetError: one line naming the file, the line and the field.
    """
    path = Path(path)
    fmt = fmt or _FORMATS.get(path.suffix.lower())
    if fmt not in ("csv", "tsv", "jsonl", "json"):
        raise LabelSetError(f"{path}: unknown table format '{path.suffix}'; use .csv, .tsv, .jsonl or .json")
    if fmt == "json":
        rows = _mapping_rows(path)
    elif fmt == "jsonl":
        rows = _jsonl_rows(path)
    else:
        rows = _delimited_rows(path, "," if fmt == "csv" else "\t")
    root = Path(images) if images is not None else path.parent
    paths, classes, targets = _to_matrix(path, rows, classes, root)
    meta = {"source": "table", "file": str(path)}
    return LabelSet(classes, paths, targets, root=str(root), split=split, meta=meta)


# A parsed row: (where, image path, labels) where labels is a list of names (labels layout) or a
# dict class -> value (per-class layout); ``where`` is "line 7" or "key 'a.jpg'" for messages.
_Row = tuple[str, str, "list[str] | dict[str, int]"]


@register_reader("table")
def prepare_table(root: Path, images: str | None = None, classes: list[str] | None = None, val: str | None = None,
                  test: str | None = None) -> dict[str, LabelSet]:
    """``mlic prepare table``: train from the table ``root``; val and test from further tables with its classes."""
    sets = {"train": read_table(root, images=images, classes=classes, split="train")}
    for split, path in (("val", val), ("test", test)):
        if path is not None:
            # same classes, same column order, same image folder unless the table sits elsewhere
            sets[split] = read_table(path, images=images, classes=sets["train"].classes, split=split)
    return sets


def _split_labels(text: str) -> list[str]:
    return [name.strip() for name in text.split(LABEL_SEPARATOR) if name.strip()]


def _delimited_rows(path: Path, delimiter: str) -> list[_Row]:
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise LabelSetError(f"{path}: not found") from None
    rows: list[_Row] = []
    with f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise LabelSetError(f"{path}: empty file; expected a header row such as 'path,labels'")
            if "path" not in header:
                raise LabelSetError(f"{path}: line 1: missing column 'path' (header is {header[:6]})")
            if len(set(header)) != len(header):
                dupes = sorted({h for h in header if header.count(h) > 1})
                raise LabelSetError(f"{path}: line 1: duplicate columns {dupes}")
            if not (len(header) == 2 and "labels" in header):
                check_class_names([h for h in header if h != "path"], f"{path}: line 1")
            path_col = header.index("path")
            by_labels = len(header) == 2 and "labels" in header
            for record in reader:
                where = f"line {reader.line_num}"
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if len(record) != len(header):
                    raise LabelSetError(f"{path}: {where}: {len(record)} fields, the header has {len(header)}")
                image = record[path_col].strip()
                if by_labels:
                    rows.append((where, image, _split_labels(record[1 - path_col])))
                    continue
                values = {}
                for name, text in zip(header, record):
                    if name == "path":
                        continue
                    value = _VALUES.get(text.strip())
                    if value is None:
                        raise LabelSetError(
                            f"{path}: {where}: column '{name}': value '{text}' is not 1, 0 or -1 (unknown)")
                    values[name] = value
                rows.append((where, image, values))
        except csv.Error as e:
            raise LabelSetError(f"{path}: line {reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise LabelSetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return rows


def _jsonl_rows(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelSetError(f"{path}: {where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise LabelSetError(f"{path}: {where}: expected a JSON object like {{\"path\": ..., \"labels\": [...]}}")
        if "path" not in record:
            raise LabelSetError(f"{path}: {where}: missing field 'path'")
        image = record.pop("path")
        if not isinstance(image, str):
            raise LabelSetError(f"{path}: {where}: field 'path' must be a string, got {type(image).__name__}")
        if "labels" in record:
            rows.append((where, image, _label_list(path, where, "labels", record.pop("labels"))))
            if record:
                raise LabelSetError(f"{path}: {where}: unexpected fields {sorted(record)[:5]} beside 'labels'")
            continue
        for name, value in record.items():
            if isinstance(value, bool) or value not in (1, 0, -1):
                raise LabelSetError(f"{path}: {where}: field '{name}': value {value!r} is not 1, 0 or -1 (unknown)")
        rows.append((where, image, {name: int(value) for name, value in record.items()}))
    return rows


def _label_list(path: Path, where: str, field: str, value) -> list[str]:
    if isinstance(value, str):
        return _split_labels(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LabelSetError(f"{path}: {where}: field '{field}' must be a list of class names or a '|'-joined string")
    return [v.strip() for v in value if v.strip()]


def _mapping_rows(path: Path) -> list[_Row]:
    def no_duplicate_keys(pairs):
        mapping = {}
        for key, value in pairs:
            if key in mapping:
                raise LabelSetError(f"{path}: duplicate path '{key}'")
            mapping[key] = value
        return mapping

    try:
        mapping = json.loads("\n".join(read_lines(path)), object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise LabelSetError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(mapping, dict):
        raise LabelSetError(f"{path}: expected a JSON object mapping image path -> list of labels")
    return [(f"key '{image}'", image, _label_list(path, f"key '{image}'", image, labels))
            for image, labels in mapping.items()]


def _image_path(path: Path, where: str, image: str, root: Path) -> str:
    """``image`` as a path relative to ``root``; refused (one line) when it leaves ``root``."""
    if os.path.isabs(image):  # inside root, judged on the text (also against root's real location): relative
        for base in dict.fromkeys((os.path.abspath(root), os.path.realpath(root))):
            relative = os.path.relpath(os.path.normpath(image), base)
            if image_path_problem(relative) is None and relative != ".":
                image = relative.replace(os.sep, "/")
                break
    problem = image_path_problem(image)
    if problem is not None:
        raise LabelSetError(f"{path}: {where}: image path {image!r} leaves the image folder {root} ({problem}); "
                            "give paths relative to it (option images= sets it)")
    return image


def _to_matrix(path: Path, rows: list[_Row], classes: list | None,
               root: Path) -> tuple[list[str], list[str], np.ndarray]:
    seen: dict[str, str] = {}
    images = []
    for where, image, _ in rows:
        if not image:
            raise LabelSetError(f"{path}: {where}: field 'path' is empty")
        image = _image_path(path, where, image, root)
        key = posixpath.normpath(image.replace("\\", "/"))
        if key in seen:
            raise LabelSetError(f"{path}: {where}: duplicate path '{image}' (first on {seen[key]})")
        seen[key] = where
        images.append(image)
    per_class = bool(rows) and isinstance(rows[0][2], dict)
    if classes is None:
        if per_class:
            classes = check_class_names(list(rows[0][2]), f"{path}: {rows[0][0]}")
        else:
            for where, _, labels in rows:
                for name in labels:
                    if (problem := class_name_problem(name)) is not None:
                        raise LabelSetError(f"{path}: {where}: label {name!r} {problem}; class names must be "
                                            "non-empty strings on one line")
            classes = sorted({name for _, _, labels in rows for name in labels})
    else:
        # a list given as an option: YAML may read the names 1, 2 as numbers, which name the labels '1', '2'
        classes = [str(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else c for c in classes]
        classes = check_class_names(classes, f"{path}: the class list given (option classes)")
    if not classes:
        raise LabelSetError(f"{path}: no classes found; give the labels of at least one image or a class list")
    column = {name: j for j, name in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), dtype=np.int8)
    for i, (where, _, labels) in enumerate(rows):
        if isinstance(labels, dict):
            missing = [c for c in classes if c not in labels]
            if missing:
                raise LabelSetError(f"{path}: {where}: missing class fields {missing[:5]}")
            extra = [c for c in labels if c not in column]
            if extra:
                raise LabelSetError(f"{path}: {where}: unknown class fields {extra[:5]} (not in the class list)")
            targets[i] = [labels[c] for c in classes]
        else:
            for name in labels:
                if name not in column:
                    raise LabelSetError(f"{path}: {where}: unknown label '{name}' (not in the class list)")
                targets[i, column[name]] = 1
    return images, classes, targets
