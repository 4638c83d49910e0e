"""mlic as a library: ``mlic.train``, ``mlic.load``, ``mlic.evaluate`` and the :class:`Model` they hand back.

Each function is the command of the same name with the same defaults: ``mlic.train(**options)`` takes every
``mlic train`` option as a keyword and builds its job through :func:`mlic.engine.job.make_job`, as the CLI
does (the same run folder, refusals and MultiDigits demo settings); ``mlic.evaluate`` is ``mlic eval``;
``Model.predict`` reads images exactly as ``mlic predict`` reads files.

Example:
    >>> import mlic
    >>> run = mlic.train(out="runs/demo")                  # MultiDigits, the demo's settings
    >>> model = mlic.load(run.out_dir)
    >>> model.predict(["a.jpg"], top_k=3)[0].labels
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from mlic.errors import MlicError


@dataclass
class Run:
    """A finished training run (what ``mlic train`` prints, as values)."""

    out_dir: Path
    """The run folder: model.safetensors, model.json, metrics.jsonl, report.md, ..."""
    best_epoch: int
    """1-based epoch kept by validation mAP."""
    best_val_map: float
    test_metrics: dict | None
    """The metrics table of the kept model on test (None without a test split)."""
    history: list[dict]
    """One record per epoch (the lines of metrics.jsonl)."""
    seconds: float

    def load(self) -> Model:
        """The trained model."""
        return load(self.out_dir)


def train(**options) -> Run:
    """Train as ``mlic train`` does; every option of the command is a keyword of the same name.

    ``head_args``, ``loss_args`` and ``linear_args`` are dicts (the CLI's repeatable ``--head-arg KEY=VALUE``).
    Without ``data``, MultiDigits with the demo's settings. ``log`` (default ``print``) receives each line.

    Raises:
        MlicError: an unknown keyword (the message lists the valid ones), or whatever ``mlic train`` refuses.
    """
    from mlic.engine.job import make_job
    from mlic.engine.run import run

    valid = list(inspect.signature(make_job).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MlicError(f"mlic.train: unknown keyword(s) {', '.join(unknown)}; it takes {', '.join(valid)}")
    result = run(make_job(**options))
    return Run(Path(result.out_dir), result.best_epoch, result.best_val_map, result.test_metrics, result.history,
               result.seconds)


def load(checkpoint: str | Path, device: str | None = None, engine: str | None = None) -> Model:
    """A model from a run or model folder, an ``.onnx`` file from ``mlic export onnx``, an official
    Query2Label release folder or an official ML-Decoder ``.pth`` file."""
    from mlic.engine.predict import Predictor

    return Model(Predictor(checkpoint, device=device, engine=engine))


def as_rgb(image) -> Image.Image:
    """Any image a user holds as an 8-bit RGB PIL image, upright.

    Accepts a PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, F, ...; EXIF orientation applied, as for a
    file), a NumPy array (H, W) or (H, W, 1|3|4) of uint8 (or floats in [0, 1]), or a tensor (C, H, W) or
    (H, W) of uint8 (or floats in [0, 1]).
    """
    from mlic.data.images import to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
            raise MlicError(f"an array of shape {tuple(image.shape)} is not an image; give (H, W), (H, W, 3) or "
                            "(H, W, 4) arrays, or (C, H, W) tensors")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all() or \
                    array.min() < 0 or array.max() > 1:
                raise MlicError(f"an image array of {array.dtype} must hold uint8 pixels or floats in [0, 1]")
            array = np.round(array * 255).astype(np.uint8)
        return to_rgb(Image.fromarray(np.ascontiguousarray(array)))
    raise MlicError(f"{type(image).__name__} is not an image; give a path, a PIL image, a NumPy array or a tensor")


@dataclass
class Explanation:
    """Query2Label's per-label attention for one image."""

    classes: list[str]
    scores: np.ndarray
    """(K,) probabilities."""
    maps: np.ndarray
    """(K, h, w) attention of each label's query over the feature map, summing to 1 per label."""


class Model:
    """A loaded classifier: its classes, thresholds, input size, and prediction on any images.

    Args:
        predictor: the engine behind it (:class:`mlic.engine.predict.Predictor`; PyTorch or onnxruntime).
    """

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.classes: list[str] = predictor.classes
        self.thresholds: np.ndarray = predictor.thresholds
        """(K,) per-class score thresholds tuned on validation."""
        self.image_size: int = predictor.img_size
        self.config = getattr(predictor.model, "config", None)
        """The :class:`~mlic.config.ModelConfig` that rebuilds it (None for an ONNX file)."""
        self.meta: dict = predictor.meta

    def __repr__(self) -> str:
        return f"mlic.Model({len(self.classes)} classes, {self.image_size}px, {self.predictor.engine.name})"

    def _batch(self, images) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
        """uint8 (B, 3, S, S) of the readable images, their positions, and an error per unreadable one."""
        from mlic.data.images import ImageError, read_image

        tensors, rows, errors = [], [], {}
        for i, image in enumerate(images):
            try:
                if isinstance(image, (str, Path)):  # as `mlic predict` reads the file: the same pixels
                    tensors.append(read_image(image, self.predictor.transform))
                else:
                    tensors.append(self.predictor.transform(as_rgb(image)))
                rows.append(i)
            except (ImageError, MlicError, OSError) as e:
                errors[i] = str(e)
        return (torch.stack(tensors) if tensors else None), rows, errors

    @staticmethod
    def _listed(images) -> list:
        """A list of single images: a list or tuple as given, or a batch (B, C, H, W) tensor / (B, H, W, C) array."""
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return list(images)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        raise MlicError("give a list of images (paths, PIL images, arrays or tensors), e.g. [image], or a batch: "
                        "a (B, C, H, W) tensor or a (B, H, W, C) array")

    def scores(self, images, batch_size: int = 32) -> np.ndarray:
        """(N, K) float32 probabilities; a row of NaN for an image that cannot be read."""
        images = self._listed(images)
        out = np.full((len(images), len(self.classes)), np.nan, np.float32)
        for start in range(0, len(images), batch_size):
            batch, rows, _ = self._batch(images[start:start + batch_size])
            if batch is not None:
                out[[start + r for r in rows]] = self.predictor.scores(batch)
        return out

    def predict(self, images, top_k: int | None = None, threshold: float | None = None, batch_size: int = 32):
        """One :class:`~mlic.engine.predict.Prediction` per image: its labels at or above the per-class
        thresholds (or ``threshold``), best first, at most ``top_k``. An image that cannot be read gives a
        Prediction with ``error`` set, and the others are scored."""
        from mlic.engine.predict import Prediction

        images = self._listed(images)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch, rows, errors = self._batch(chunk)
            scores = dict(zip(rows, self.predictor.scores(batch))) if batch is not None else {}
            for i, image in enumerate(chunk):
                name = str(image) if isinstance(image, (str, Path)) else ""
                if i in errors:
                    out.append(Prediction(name, np.full(len(self.classes), np.nan, np.float32), [], errors[i]))
                else:
                    out.append(Prediction(name, scores[i], self.predictor.labels(scores[i], threshold, top_k)))
        return out

    def explain(self, image) -> Explanation:
        """Query2Label's attention maps for one image (a path or any image :func:`as_rgb` takes)."""
        if not self.predictor.has_attention:
            raise MlicError("explain needs a Query2Label model loaded in PyTorch (not ONNX)")
        batch, _, errors = self._batch([image])
        if batch is None:
            raise MlicError(errors[0])
        scores, maps = self.predictor.engine.attention(batch)
        return Explanation(list(self.classes), scores[0], maps[0])


@dataclass
class Evaluation:
    """What ``mlic eval`` prints: the metrics table and which images were scored."""

    metrics: dict
    """The table; ``per_class_ap`` a (K,) array (nan for classes with no known positive)."""
    labelset: object
    rows: np.ndarray
    """The readable (scored) rows."""
    bad: list[str]
    """Messages of the unreadable images."""


def evaluation(model: Model | str | Path, data: str | Path | None = None, split: str = "test", batch_size: int = 64,
               workers: int = 2, strict_images: bool = False, max_bad_images: str = "1%") -> Evaluation:
    """Score ``model`` on ``data``'s ``split`` (no data: the MultiDigits test split): the work of ``mlic eval``."""
    import warnings

    from mlic.data.images import BadImageCheck, parse_bad_limit
    from mlic.data.labelset import LabelSetError
    from mlic.data.splits import evaluation_split
    from mlic.engine.evaluate import evaluate_scores, score_labelset

    bad_limit = parse_bad_limit(max_bad_images)
    model = model if isinstance(model, Model) else load(model, device=None)
    labelset = evaluation_split(Path(data) if data is not None else None, split)
    if labelset.classes != model.classes:
        raise LabelSetError(f"the model's {len(model.classes)} classes do not match the {labelset.num_classes} "
                            f"classes of {data}; evaluate on data with the same classes")
    torch_model = model.predictor.model
    if torch_model is None:
        raise MlicError("evaluation needs a PyTorch model; give the run folder rather than its ONNX export")
    cfg = torch_model.config
    check = BadImageCheck(split, len(labelset), bad_limit, strict_images)
    scores, rows, bad = score_labelset(torch_model, labelset, cfg.img_size, cfg.mean, cfg.std,
                                       next(torch_model.parameters()).device, batch_size, workers, check=check)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes without a known positive: mAP_classes says how many
        metrics = evaluate_scores(scores, labelset.targets, rows=rows)
    metrics["unreadable_images"] = len(bad)
    return Evaluation(metrics, labelset, rows, bad)


def evaluate(model: Model | str | Path, data: str | Path | None = None, split: str = "test", batch_size: int = 64,
             workers: int = 2, strict_images: bool = False, max_bad_images: str = "1%") -> dict:
    """``mlic eval`` as a function: the metrics table of ``model`` on ``data``'s ``split`` (no data: the
    MultiDigits test split), with ``per_class_ap`` as a dict by class name (None for a class with no known
    positive) and no NaN anywhere (None instead), as ``mlic eval --json`` writes it."""
    from mlic.engine.report import finite_or_none, metrics_record

    done = evaluation(model, data, split, batch_size, workers, strict_images, max_bad_images)
    return finite_or_none(metrics_record(done.metrics, done.labelset.classes))
