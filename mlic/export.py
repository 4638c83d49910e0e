"""ONNX export: one file that scores images in onnxruntime, with no PyTorch and no way to get the input wrong.

The graph's input is ``images``: uint8 RGB (B, 3, S, S), pixel values 0..255 in NCHW order, the batch axis
dynamic. uint8 rather than float because it is what a decoder hands over, a quarter of the bytes, and it
leaves no normalisation for the caller to get wrong: the ``/255``, mean and std of the model live inside the
graph. The resize to S x S (any method; mlic uses antialiased bilinear, see
:func:`mlic.data.images.build_transform`) stays outside, as it depends on the decoder. The output is
``probabilities``: float32 (B, K) sigmoid scores.

The model's metadata (``metadata_props``) carries what a caller needs: ``mlic_classes`` and
``mlic_thresholds`` (JSON lists), ``mlic_img_size``, ``mlic_head``, ``mlic_backbone``, ``mlic_version``
and ``mlic_input`` (the sentence above).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlic import __version__
from mlic.errors import MlicError
from mlic.io import atomic_write_bytes, fs_error, temp_dir_for

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
INPUT_DESCRIPTION = "uint8 RGB (B, 3, S, S), values 0..255, NCHW, resized to S x S; normalisation is in the graph"
PARITY_TOLERANCE = 1e-4
OPSET = 18


class ExportError(MlicError):
    """An export that cannot be made or does not match PyTorch; the message names the file and the fix."""


class ProbabilityGraph(nn.Module):
    """uint8 images (B, 3, S, S) -> probabilities (B, K): normalisation, the classifier and the sigmoid in one.

    Args:
        model: a classifier taking normalised float images, with ``config.mean`` / ``config.std``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        mean, std = model.config.mean, model.config.std
        # x / 255 - mean) / std  =  x * scale + shift, as mlic.data.images.normalize computes it
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> float32 (B, K)."""
        return torch.sigmoid(self.model(images.float() * self.scale + self.shift).float())


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    max_diff: float
    """Largest |PyTorch - onnxruntime| probability on the check batch (of the float32 graph)."""
    int8_path: Path | None = None
    int8_max_diff: float | None = None
    """Same for the int8 graph (dynamic quantization changes scores; reported, not bounded)."""


def onnx_metadata(meta: dict, model: nn.Module) -> dict[str, str]:
    """The ``metadata_props`` an exported model carries (all values strings)."""
    config = model.config
    classes = list(meta["classes"])
    thresholds = [float(t) for t in (meta.get("thresholds") or [0.5] * len(classes))]
    return {"mlic_classes": json.dumps(classes), "mlic_thresholds": json.dumps(thresholds),
            "mlic_img_size": str(config.img_size), "mlic_head": config.head, "mlic_backbone": config.backbone,
            "mlic_version": __version__, "mlic_input": INPUT_DESCRIPTION}


def _set_metadata(onnx_model, metadata: dict[str, str]) -> None:
    del onnx_model.metadata_props[:]
    for key, value in metadata.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value


def ort_session(path_or_bytes: str | Path | bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_batch(img_size: int, batch: int = 3, seed: int = 0) -> np.ndarray:
    """A fixed uint8 batch (B, 3, S, S) of smooth random images (noise with structure, not flat grey)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (batch, 3, 8, 8)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(img_size, img_size), mode="bilinear")
    noise = rng.normal(0, 20, (batch, 3, img_size, img_size))
    return np.clip(smooth.numpy() + noise, 0, 255).astype(np.uint8)


def max_difference(graph: ProbabilityGraph, session, images: np.ndarray) -> float:
    """max |PyTorch - onnxruntime| over the probabilities of ``images`` (uint8 (B, 3, S, S))."""
    with torch.no_grad():
        expected = graph(torch.from_numpy(images)).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if got.shape != expected.shape:
        raise ExportError(f"onnxruntime returned shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got.astype(np.float64) - expected).max())


def to_onnx(graph: ProbabilityGraph):
    """Trace ``graph`` with torch.export (batch axis dynamic) into an ONNX ModelProto.

    Raises:
        ExportError: the exporter failed (one line with its reason).
    """
    model = graph.model
    example = torch.from_numpy(check_batch(model.config.img_size, batch=2, seed=1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                                        opset_version=OPSET, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter can fail in many ways; the user needs one line
        raise ExportError(f"ONNX export of the {model.config.head} model failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
    return program.model_proto


def export_onnx(model: nn.Module, meta: dict, out: str | Path, int8: bool = False,
                tolerance: float = PARITY_TOLERANCE) -> ExportResult:
    """Export ``model`` (a classifier on CPU) to ``out`` and check it against PyTorch.

    Args:
        model: classifier with a ``config`` (ModelConfig); put in eval mode here.
        meta: the checkpoint's metadata (``classes``, optional ``thresholds``).
        out: the .onnx file to write (atomically). With ``int8``, the quantized model goes beside it as
            ``<stem>.int8.onnx``.
        int8: also write an onnxruntime dynamic-quantized (int8 weights) copy.
        tolerance: largest allowed probability difference between PyTorch and the float32 graph.

    Raises:
        ExportError: the exporter failed, or the float32 graph differs from PyTorch by more than ``tolerance``.
    """
    import onnx

    out = Path(out)
    model = model.to("cpu").eval()
    graph = ProbabilityGraph(model).eval()
    size = model.config.img_size
    onnx_model = to_onnx(graph)
    metadata = onnx_metadata(meta, model)
    _set_metadata(onnx_model, metadata)
    data = onnx_model.SerializeToString()
    diff = max_difference(graph, ort_session(data), check_batch(size))  # batch 3: checks the dynamic axis too
    if not diff <= tolerance:
        raise ExportError(f"{out}: onnxruntime and PyTorch differ by {diff:.3g} > {tolerance:g} in a probability; "
                          "not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    result = ExportResult(out, diff)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = int8_output(out)
        # onnxruntime writes its intermediate files beside its input and leaves them when it fails: give it
        # a folder of its own, named as mlic.io's temporaries are, so that a killed export's is removed too
        tmp = temp_dir_for(int8_path)
        (tmp / "in.onnx").symlink_to(out.resolve())
        quiet = logging.getLogger()  # onnxruntime logs advice on the root logger
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(tmp / "in.onnx"), str(tmp / "out.onnx"), weight_type=QuantType.QInt8)
            quantized = onnx.load(str(tmp / "out.onnx"))
        except OSError as e:
            raise fs_error(e, int8_path) from None
        except Exception as e:  # noqa: BLE001 - protobuf and onnxruntime fail in many ways on a full disk
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ExportError(f"{int8_path}: the int8 model could not be written ({reason}); check the free space "
                              f"in {int8_path.parent} (the float model {out} is complete)") from None
        finally:
            quiet.setLevel(level)
            shutil.rmtree(tmp, ignore_errors=True)
        _set_metadata(quantized, {**metadata, "mlic_quantization": "onnxruntime dynamic, int8 weights"})
        data8 = quantized.SerializeToString()
        atomic_write_bytes(int8_path, data8)
        result.int8_path = int8_path
        result.int8_max_diff = max_difference(graph, ort_session(data8), check_batch(size))
    return result


def int8_output(out: str | Path) -> Path:
    """Where ``--int8`` writes the quantized copy of ``out``: ``<stem>.int8.onnx`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".int8.onnx")


def read_onnx_metadata(path: str | Path) -> dict:
    """Classes, thresholds, input size and the rest of an mlic-exported ONNX file's metadata.

    Raises:
        ExportError: the file is not readable ONNX, or was not exported by mlic (no class names, wrong input).
    """
    path = Path(path)
    try:
        session = ort_session(path)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such ONNX file") from None
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: not a readable ONNX model ({type(e).__name__}); export one with "
                          "'mlic export onnx'") from None
    return check_session(session, path)[1]


def check_session(session, path: str | Path) -> tuple[object, dict]:
    """(session, metadata) after checking the graph is an mlic export: named input/output, classes, size."""
    props = session.get_modelmeta().custom_metadata_map
    if "mlic_classes" not in props or "mlic_img_size" not in props:
        raise ExportError(f"{path}: no mlic metadata (class names, input size); this ONNX file was not made by "
                          "'mlic export onnx' - export the checkpoint with it")
    from mlic.config import IMG_SIZES
    from mlic.engine.checkpoint import check_model_meta

    try:
        meta = {"classes": json.loads(props["mlic_classes"]),
                "thresholds": json.loads(props.get("mlic_thresholds", "null")),
                "img_size": int(props["mlic_img_size"]), "head": props.get("mlic_head", ""),
                "backbone": props.get("mlic_backbone", ""), "mlic_version": props.get("mlic_version", ""),
                "quantization": props.get("mlic_quantization")}
    except ValueError as e:
        raise ExportError(f"{path}: its mlic metadata is damaged ({str(e).splitlines()[0][:80]}); export the model "
                          "again with 'mlic export onnx'") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if not IMG_SIZES[0] <= meta["img_size"] <= IMG_SIZES[1]:
        raise ExportError(f"{path}: mlic_img_size {meta['img_size']} is not an input size ({IMG_SIZES[0]} to "
                          f"{IMG_SIZES[1]}); export the model again")
    shape = next((o.shape for o in outputs if o.name == OUTPUT_NAME), None)
    width = shape[1] if shape and len(shape) == 2 and isinstance(shape[1], int) else None
    check_model_meta(meta, path, num_outputs=width, error=ExportError)
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].type != "tensor(uint8)" or \
            list(inputs[0].shape[1:]) != [3, meta["img_size"], meta["img_size"]] or \
            OUTPUT_NAME not in [o.name for o in outputs]:
        raise ExportError(f"{path}: input {[(i.name, i.type, i.shape) for i in inputs]} is not the uint8 "
                          f"(B, 3, {meta['img_size']}, {meta['img_size']}) images of an mlic export; export again")
    return session, meta
