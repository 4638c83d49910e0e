"""Prediction files: streaming ``mlic predict`` results to JSON lines and CSV, and resuming them.

Both formats are appended batch by batch and flushed, so a killed run loses at most its last batch;
``--resume`` cuts a half-written last record and continues. Which model wrote a file (its weights,
classes, thresholds and the ``--threshold`` / ``--top-k`` that shaped the labels) is kept beside it in
``.<name>.mlic.json``, so a resume with another model refuses instead of mixing two models' rows.
Paths are compared resolved: the same image given once relative and once absolute is one row. File
names that are not valid UTF-8 are written byte for byte (CSV) or as JSON escapes (JSON lines), and
read back to the same name.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
from pathlib import Path

from mlic.errors import MlicError
from mlic.io import atomic_write_bytes, fs_error
from mlic.outputs import Output, OutputError, check_outputs

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def model_identity(weights: list[Path], classes: list[str], thresholds: list[float], threshold: float | None,
                   top_k: int | None) -> str:
    """A short hash of everything that decides a prediction row: weight bytes, classes and label rule."""
    h = hashlib.sha256()
    for path in weights:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    h.update(json.dumps([classes, [round(float(t), 9) for t in thresholds], threshold, top_k]).encode())
    return h.hexdigest()[:20]


def sidecar(path: Path) -> Path:
    """Where the identity of the model that wrote ``path`` is kept."""
    return path.with_name(f".{path.name}.mlic.json")


def key(path: str) -> str:
    """The resolved form of an image path, under which rows are compared."""
    return str(Path(path).resolve())


def _complete_jsonl(data: str) -> tuple[list[dict], int]:
    """Rows of a JSON-lines text and the length of its complete part (a half-written last line is not)."""
    end = data.rfind("\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, end


def _complete_csv(data: str, columns: int) -> tuple[list[list[str]], int]:
    """Records of a CSV text and the length of its complete part.

    A record is complete when it has ``columns`` fields and ends in a line break outside quotes, so a
    path holding a newline (a quoted field over two lines) is one record, and a record cut by a crash
    inside its quotes is dropped rather than read as a shorter path.
    """
    consumed = [0, ""]  # characters read so far, and the last line read

    def feed():
        for line in data.splitlines(keepends=True):
            consumed[0] += len(line)
            consumed[1] = line
            yield line

    rows, end = [], 0
    try:
        for row in csv.reader(feed()):
            if len(row) != columns or not consumed[1].endswith("\n"):
                break
            rows.append(row)
            end = consumed[0]
    except csv.Error:
        pass
    return rows, end


class ResultWriter:
    """Streams predictions to JSON lines and/or CSV as they come, flushing each batch.

    JSON lines: ``{"path", "labels": [{"label", "score"}], "scores": {class: score}, "error"}`` per image.
    CSV: ``path,labels,<one column per class>``; labels joined by ``|``; an unreadable file has the
    error in ``labels`` and empty scores. With ``resume``, files that exist are appended to and the
    paths they hold are skipped.

    Args:
        classes: the model's class names (the CSV's columns).
        jsonl, csv_path: the files to write (either may be None).
        resume: continue existing files; they must be mlic's, of the same model (``identity``).
        identity: :func:`model_identity` of the model writing the rows.
        inputs: files the command reads (checkpoint files, images): never an output.
        overwrite: replace existing files whatever they hold (still never an input).

    Raises:
        OutputError: an output is an input, the two outputs share a path, or a file is not mlic's
            (without ``overwrite``), or holds rows of another model (``resume``).
    """

    def __init__(self, classes: list[str], jsonl: Path | None = None, csv_path: Path | None = None,
                 resume: bool = False, identity: str = "", inputs: list[Path] = (), overwrite: bool = False) -> None:
        self.classes = classes
        self.files: dict[str, object] = {}
        self.done: dict[str, set[str]] = {}
        outputs = [Output("--jsonl", Path(jsonl), "predictions-jsonl") if jsonl else None,
                   Output("--csv", Path(csv_path), "predictions-csv") if csv_path else None]
        outputs = [o for o in outputs if o]
        check_outputs(outputs, inputs, overwrite=overwrite, keep=resume)
        for out in outputs:
            kind = "jsonl" if out.kind == "predictions-jsonl" else "csv"
            path = out.path
            existing = resume and path.is_file() and path.stat().st_size > 0
            if existing:
                self._check_identity(path, out.option, identity)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", newline="", **ENCODING)  # not "w": nothing is cut before the lock is held
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise OutputError(f"{out.option} {path}: another mlic predict is writing it; wait for it or "
                                  "choose another file") from None
            self.files[kind] = handle
            self.done[kind] = self._resume(handle, path, kind) if existing else set()
            if not existing:
                handle.truncate(0)
                atomic_write_bytes(sidecar(path), json.dumps({"model": identity, "kind": out.kind}).encode())
                if kind == "csv":
                    csv.writer(handle).writerow(["path", "labels", *classes])
        if "csv" in self.files:
            self.csv = csv.writer(self.files["csv"])

    @staticmethod
    def _check_identity(path: Path, option: str, identity: str) -> None:
        try:
            saved = json.loads(sidecar(path).read_bytes()).get("model")
        except (OSError, ValueError, AttributeError):
            raise OutputError(f"{option} {path}: cannot tell which model wrote it ({sidecar(path).name} is missing "
                              "or unreadable); write to a new file instead of --resume") from None
        if saved != identity:
            raise OutputError(f"{option} {path}: holds predictions of another model, classes or label rule "
                              "(--threshold, --top-k); --resume needs the same ones, or write to a new file")

    def _resume(self, handle, path: Path, kind: str) -> set[str]:
        """The resolved paths an existing output holds, after cutting a record a crash left half-written."""
        handle.seek(0)
        data = handle.read()
        try:
            if kind == "jsonl":
                rows, end = _complete_jsonl(data)
                paths = [row["path"] for row in rows]
            else:
                rows, end = _complete_csv(data, 2 + len(self.classes))
                if not rows or rows[0] != ["path", "labels", *self.classes]:
                    raise MlicError(f"{path}: its columns are not this model's classes; cannot --resume it")
                paths = [row[0] for row in rows[1:]]
        except (ValueError, KeyError, TypeError):
            raise MlicError(f"{path}: not {kind.upper()} written by mlic predict; cannot --resume it") from None
        if end < len(data):  # a half-written last record: cut it, byte-exact
            handle.truncate(len(data[:end].encode(**ENCODING)))
        handle.seek(0, io.SEEK_END)
        return {key(p) for p in paths}

    def skip(self, resolved: str) -> bool:
        """Whether every output already holds the image whose resolved path is ``resolved`` (:func:`key`)."""
        return bool(self.done) and all(resolved in done for done in self.done.values())

    def write(self, predictions: list, keys: list[str] | None = None) -> None:
        """Append a batch of :class:`~mlic.engine.predict.Prediction` and flush; ``keys`` are their resolved
        paths where the caller has them (else resolved here)."""
        try:
            for p, resolved in zip(predictions, keys or [key(p.path) for p in predictions]):
                if "jsonl" in self.files and resolved not in self.done["jsonl"]:
                    row = {"path": p.path, "labels": [{"label": c, "score": round(s, 6)} for c, s in p.labels],
                           "scores": None if p.error else dict(zip(self.classes,
                                                                   (round(float(s), 6) for s in p.scores))),
                           "error": p.error}
                    self.files["jsonl"].write(json.dumps(row) + "\n")
                    self.done["jsonl"].add(resolved)
                if "csv" in self.files and resolved not in self.done["csv"]:
                    labels = f"error: {p.error}" if p.error else "|".join(c for c, _ in p.labels)
                    scores = [""] * len(self.classes) if p.error else [f"{s:.6f}" for s in p.scores]
                    self.csv.writerow([p.path, labels, *scores])
                    self.done["csv"].add(resolved)
            for handle in self.files.values():
                handle.flush()
        except OSError as e:
            raise fs_error(e, self._names()) from None

    def _names(self) -> str:
        return ", ".join(h.name for h in self.files.values())

    def close(self) -> None:
        for handle in self.files.values():
            try:
                handle.close()
            except OSError:
                pass


class AttentionFiles:
    """One attention-map file per image in ``--explain``: unique names, nothing mlic did not write replaced.

    ``<stem>_attention.png``; images sharing a stem (``a/x.jpg``, ``b/x.jpg``) get the path of the image
    relative to their common folder instead (``a__x_attention.png``).

    Args:
        folder: ``--explain``.
        images: {resolved path: path as given} (:func:`mlic.engine.predict.unique_paths`).
        inputs: the command's inputs (never outputs).
        overwrite: replace files that are not mlic's maps.
    """

    def __init__(self, folder: Path, images: dict[str, Path], inputs: list[Path], overwrite: bool) -> None:
        import os
        from collections import Counter

        stems = Counter(Path(p).stem for p in images.values())
        clashing = [resolved for resolved, p in images.items() if stems[Path(p).stem] > 1]
        root = Path(os.path.commonpath(clashing)) if clashing else None
        self.names: dict[str, Path] = {}
        for resolved, p in images.items():
            name = Path(p).stem if stems[Path(p).stem] == 1 else \
                "__".join(Path(resolved).relative_to(root).with_suffix("").parts)
            self.names[resolved] = folder / f"{name}_attention.png"
        check_outputs([Output("--explain", path, "attention-png") for path in self.names.values()], inputs,
                      overwrite=overwrite)

    def path(self, resolved: str) -> Path:
        """The map file of the image whose resolved path is ``resolved``."""
        return self.names[resolved]
