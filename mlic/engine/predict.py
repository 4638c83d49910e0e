"""Prediction from a saved model: images in, labels with scores out (CLI, Python, services).

One :class:`Predictor` serves two engines behind the same uint8 batch interface: ``torch`` (an mlic run or
model folder, or an official Query2Label folder) and ``onnx`` (a file from ``mlic export onnx``, run by
onnxruntime, no PyTorch model needed). Both take uint8 RGB (B, 3, S, S) resized by
:func:`mlic.data.images.build_transform`, so the two give the same scores for the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlic.data.images import ImageDataset, ImageError, build_transform, make_loader, normalize
from mlic.data.labelset import LabelSet
from mlic.engine.checkpoint import CheckpointError, load_model
from mlic.errors import MlicError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ENGINES = ("torch", "onnx")


def list_images(inputs: list[str | Path], unreadable: list[Path] | None = None) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image paths.

    Only regular files are taken from folders (a FIFO or device named ``.jpg`` would block the reader
    forever); a subfolder that cannot be listed is appended to ``unreadable`` (when given) instead of
    vanishing silently. A missing input, or one that is neither a folder nor a regular file, is an error.
    """
    paths: list[Path] = []
    skipped = [] if unreadable is None else unreadable
    for item in map(Path, inputs):
        if item.is_dir():
            found = []
            for folder, dirs, _ in os.walk(item, onerror=lambda e: skipped.append(Path(e.filename))):
                dirs.sort()
                with os.scandir(folder) as entries:
                    found += [Path(e.path) for e in entries
                              if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and regular(e)]
            paths += sorted(found)
        elif item.is_file():
            paths.append(item)
        elif item.exists():
            raise ImageError(f"{item}: not a regular file (a pipe, socket or device); give image files or folders")
        else:
            raise ImageError(f"{item}: no such file or folder")
    return paths


def regular(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a regular file (following a symlink); unreadable entries are not."""
    try:
        return entry.is_file()
    except OSError:
        return False


def read_path_list(path: str | Path) -> list[Path]:
    """Image paths from a text file, one per line (blank lines and ``#`` comments skipped); relative
    paths are taken relative to the list's folder. Names that are not valid UTF-8 are kept byte for byte."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except OSError as e:
        raise ImageError(f"{path}: cannot read the path list ({e.strerror})") from None
    items = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, items)]


def unique_paths(paths: list[Path]) -> dict[str, Path]:
    """``paths`` without repeats, keyed by their resolved form (relative = absolute), first occurrence kept.

    The keys are what prediction files compare rows by (:mod:`mlic.engine.results`): each path is resolved
    once here, not again for every file that looks at it.
    """
    out: dict[str, Path] = {}
    for p in paths:
        out.setdefault(str(Path(p).resolve()), p)
    return out


def paths_labelset(paths: list[str | Path]) -> LabelSet:
    """A LabelSet over image files with no labels (one dummy column), so the training DataLoader reads them."""
    return LabelSet(["_"], [str(p) for p in paths], np.zeros((len(paths), 1), np.int8), root=".")


@dataclass
class Prediction:
    """Scores of one image; ``labels`` are the classes at or above their threshold, best first."""

    path: str
    scores: np.ndarray
    labels: list[tuple[str, float]]
    error: str | None = None


class TorchEngine:
    """A PyTorch classifier on a device; fp32 on CPU, autocast (bf16/fp16) on CUDA."""

    name = "torch"

    def __init__(self, checkpoint: str | Path, device: str | None = None) -> None:
        from mlic.engine.evaluate import autocast_dtype

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_model(checkpoint, self.device)
        self.files = model_files(Path(checkpoint))
        self.config = self.model.config
        self.img_size = self.config.img_size
        self.head = self.config.head
        self.amp_dtype = autocast_dtype("auto", self.device)

    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images.to(self.device, non_blocking=True), self.config.mean, self.config.std)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, S, S) -> sigmoid scores (B, K) float32."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.model(self.normalized(images))
        return torch.sigmoid(logits.float()).cpu().numpy()

    def attention(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 3, S, S) -> (scores (B, K), per-label attention maps (B, K, h, w)); Query2Label only."""
        from mlic.models.explain import attention_maps

        logits, maps = attention_maps(self.model, self.normalized(images), return_logits=True)
        return torch.sigmoid(logits).cpu().numpy(), maps.cpu().numpy()


class OnnxEngine:
    """An ``mlic export onnx`` file in onnxruntime (CPU)."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from mlic.export import INPUT_NAME, OUTPUT_NAME, ExportError, check_session, ort_session

        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path}: no such ONNX file; write one with 'mlic export onnx'")
        try:
            session = ort_session(path, threads)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{path}: not a readable ONNX model ({type(e).__name__}); export one with "
                              "'mlic export onnx'") from None
        self.session, self.meta = check_session(session, path)
        self.files = [path]
        self.img_size = self.meta["img_size"]
        self.head = self.meta["head"]
        self.model = None
        self._io = ([OUTPUT_NAME], INPUT_NAME)

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, S, S) -> sigmoid scores (B, K) float32."""
        outputs, name = self._io
        return self.session.run(outputs, {name: np.ascontiguousarray(images.numpy())})[0]


def model_files(checkpoint: Path) -> list[Path]:
    """The files a checkpoint is read from: a model folder's two files, an official release's, or the file."""
    if checkpoint.is_file():
        return [checkpoint]
    names = ("model.safetensors", "model.json") if (checkpoint / "model.json").exists() else \
        ("checkpoint.pkl", "config_new.json")
    return [checkpoint / n for n in names if (checkpoint / n).is_file()]


def open_engine(checkpoint: str | Path, engine: str | None = None, device: str | None = None):
    """The engine for ``checkpoint``: ``.onnx`` files run in onnxruntime, folders in PyTorch.

    ``engine="onnx"`` with a folder uses ``<folder>/model.onnx``.
    """
    checkpoint = Path(checkpoint)
    engine = engine or ("onnx" if checkpoint.suffix == ".onnx" else "torch")
    if engine not in ENGINES:
        raise MlicError(f"--engine {engine!r}: choose torch or onnx")
    if engine == "onnx":
        path = checkpoint / "model.onnx" if checkpoint.is_dir() else checkpoint
        if checkpoint.is_dir() and not path.is_file():
            raise CheckpointError(f"{path}: not found; write it with 'mlic export onnx --checkpoint {checkpoint} "
                                  f"-o {path}'")
        return OnnxEngine(path)
    if checkpoint.suffix == ".onnx":
        raise CheckpointError(f"{checkpoint}: an ONNX file runs with --engine onnx, not torch")
    return TorchEngine(checkpoint, device)


class Predictor:
    """A loaded model (either engine) with its classes, thresholds and input transform.

    Example:
        >>> predictor = Predictor("runs/demo")            # or Predictor("demo.onnx")
        >>> predictor.predict(["photo.jpg"])[0].labels
    """

    def __init__(self, checkpoint: str | Path, device: str | None = None, engine: str | None = None) -> None:
        self.engine = open_engine(checkpoint, engine, device)
        self.meta = self.engine.meta
        self.model = self.engine.model  # the PyTorch module (torch engine), else None
        self.img_size: int = self.engine.img_size
        self.classes: list[str] = list(self.meta["classes"])
        self.thresholds = np.asarray(self.meta.get("thresholds") or [0.5] * len(self.classes), dtype=np.float64)
        self.transform = build_transform(self.img_size, train=False)
        self.files: list[Path] = self.engine.files
        """The files the model was read from: inputs that no output may replace."""

    @property
    def has_attention(self) -> bool:
        """Whether per-label attention maps are available (a Query2Label model in PyTorch)."""
        return self.model is not None and self.engine.head == "query2label"

    def tensor(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL RGB images -> uint8 (B, 3, S, S) batch."""
        return torch.stack([self.transform(im) for im in images])

    def scores(self, images: list[Image.Image] | torch.Tensor) -> np.ndarray:
        """Sigmoid scores (B, K) for RGB PIL images or a uint8 (B, 3, S, S) batch."""
        batch = images if isinstance(images, torch.Tensor) else self.tensor(images)
        return self.engine.probabilities(batch)

    def labels(self, scores: np.ndarray, threshold: float | None = None, top_k: int | None = None):
        """(class, score) pairs at or above the threshold (per class unless given), best first."""
        thr = self.thresholds if threshold is None else np.full(len(self.classes), threshold)
        order = np.argsort(-scores)
        chosen = [(self.classes[k], float(scores[k])) for k in order if scores[k] >= thr[k]]
        return chosen[:top_k] if top_k else chosen

    def stream(self, paths: list[str | Path] | LabelSet, batch_size: int = 32, workers: int = 0,
               threshold: float | None = None, top_k: int | None = None) -> Iterator[list[Prediction]]:
        """Predict files batch by batch, decoding in ``workers`` DataLoader processes.

        Yields one list of Predictions per batch, in the order the files were given; an unreadable file
        yields a Prediction with ``error`` set, NaN scores and no labels. Memory stays flat: nothing
        is kept between batches.
        """
        labelset = paths if isinstance(paths, LabelSet) else paths_labelset(paths)
        dataset = ImageDataset(labelset, self.transform, targets=np.zeros((len(labelset), 0), np.int8))
        loader = make_loader(dataset, batch_size, workers=workers, prefetch_factor=2)
        nan = np.full(len(self.classes), np.nan, dtype=np.float32)
        start = 0
        for images, _, indices, errors in loader:
            # a batch holds rows start..start+n in order; the dropped ones are the unreadable files
            n = len(indices) + len(errors)
            scores = self.scores(images) if len(indices) else np.zeros((0, len(self.classes)), np.float32)
            by_index = dict(zip(indices.tolist(), scores))
            messages = iter(errors)
            out = []
            for i in range(start, start + n):
                path = str(labelset.path(i))
                if i in by_index:
                    out.append(Prediction(path, by_index[i], self.labels(by_index[i], threshold, top_k)))
                else:
                    out.append(Prediction(path, nan, [], next(messages)))
            start += n
            yield out

    def predict(self, paths: list[str | Path], batch_size: int = 32, threshold: float | None = None,
                top_k: int | None = None) -> list[Prediction]:
        """Predict files in this process; an unreadable file yields a Prediction with ``error`` set."""
        return [p for batch in self.stream(paths, batch_size, 0, threshold, top_k) for p in batch]

    def predict_images(self, images: list[Image.Image], threshold: float | None = None,
                       top_k: int | None = None) -> list[Prediction]:
        """Predict decoded PIL images (e.g. uploads); ``path`` is left empty."""
        scores = self.scores(images)
        return [Prediction("", s, self.labels(s, threshold, top_k)) for s in scores]
