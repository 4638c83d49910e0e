"""Importers for published checkpoints: the official Query2Label releases (SlongLiu/query2labels) and
ML-Decoder releases (Alibaba-MIIL/ML_Decoder, see ``load_ml_decoder``).

A release folder holds ``checkpoint.pkl`` (a torch pickle whose ``state_dict`` has the weights,
keys possibly prefixed ``module.``) and ``config_new.json`` (the run's arguments). Keys are mapped
to ours by explicit rules, one set per backbone family:

- head: ``transformer.encoder.*`` -> ``head.encoder.*``, ``transformer.decoder.*`` ->
  ``head.decoder.*``, ``input_proj.*`` / ``query_embed.*`` / ``fc.*`` -> ``head.*``.
- ``backbone.1.pe`` (the stored sine encoding for the trained size) is compared with the
  encoding we compute and dropped.
- ResNet (torchvision names, frozen BatchNorm): ``backbone.0.body.*`` -> ``backbone.body.*``;
  the BatchNorm ``num_batches_tracked`` counters the frozen layers lack are set to 0.
- TResNet / TResNet v2: ``backbone.0.body.body.*`` -> ``backbone.body.body.*`` with
  ``convN.0.`` / ``convN.0.0.`` -> ``convN.conv.``, ``convN.1.`` / ``convN.0.1.`` -> ``convN.bn.``,
  ``downsample.i.0.`` -> ``downsample.i.conv.``, ``downsample.i.1.`` -> ``downsample.i.bn.``; the
  authors trained them with InPlaceABN, which scales by |w| + eps, so every norm weight becomes
  ``abs(w) + 1e-5`` for timm's BatchNorm (``inplace_abn_to_batchnorm``).
- Swin: ``backbone.0.*`` -> ``backbone.body.*`` with ``layers.i.downsample`` ->
  ``layers.(i+1).downsample``; ``relative_position_index`` and ``attn_mask`` (recomputed) dropped.
- CvT: ``backbone.0.*`` -> ``backbone.*`` (our CvT has the official layout).

After mapping, the key set and every shape must equal our model's exactly.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from mlic.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from mlic.errors import MlicError
from mlic.io import UnsafeFileError, load_torch_weights
from mlic.models.backbones import strip_prefixes
from mlic.models.classifier import Classifier, build_model
from mlic.models.heads import sine_position_encoding
from mlic.models.weights import WeightsError, check_state_dict

COCO_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
"""The 80 COCO 2014 categories in category-id order (the label order of the Q2L COCO releases)."""

# official backbone name -> (our backbone name, key family, output stride)
BACKBONES: dict[str, tuple[str, str, int]] = {
    "resnet18": ("resnet18", "resnet", 32),
    "resnet34": ("resnet34", "resnet", 32),
    "resnet50": ("resnet50", "resnet", 32),
    "resnet101": ("resnet101", "resnet", 32),
    "tresnetl": ("tresnet_l", "tresnet", 32),
    "tresnetxl": ("tresnet_xl", "tresnet", 32),
    "tresnetl_v2": ("tresnet_v2_l", "tresnet", 32),
    "swin_B_224_22k": ("swin_base_patch4_window7_224", "swin", 32),
    "swin_B_384_22k": ("swin_base_patch4_window12_384", "swin", 32),
    "swin_L_224_22k": ("swin_large_patch4_window7_224", "swin", 32),
    "swin_L_384_22k": ("swin_large_patch4_window12_384", "swin", 32),
    "CvT_w24": ("cvt_w24", "cvt", 16),
}

HEAD_RULES: tuple[tuple[str, str], ...] = (
    ("transformer.encoder.", "head.encoder."),
    ("transformer.decoder.", "head.decoder."),
    ("input_proj.", "head.input_proj."),
    ("query_embed.", "head.query_embed."),
    ("fc.", "head.fc."),
)

TRESNET_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\.(conv\d)\.0\.0\."), r".\1.conv."),
    (re.compile(r"\.(conv\d)\.0\.1\."), r".\1.bn."),
    (re.compile(r"\.(conv\d)\.0\."), r".\1.conv."),
    (re.compile(r"\.(conv\d)\.1\."), r".\1.bn."),
    (re.compile(r"\.downsample\.(\d)\.0\."), r".downsample.\1.conv."),
    (re.compile(r"\.downsample\.(\d)\.1\."), r".downsample.\1.bn."),
)

INPLACE_ABN_EPS = 1e-5
BN_WEIGHT = re.compile(r"\.bn\.weight$")


def rename_tresnet_key(rest: str) -> str:
    """An official TResNet key (``conv1.0.weight``, ``layer2.0.conv2.0.1.bias``, ...) in timm's names."""
    rest = "." + rest
    for pattern, repl in TRESNET_RULES:
        rest = pattern.sub(repl, rest)
    return rest[1:]


def inplace_abn_to_batchnorm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Turn a renamed InPlaceABN-trained TResNet (keys under ``prefix``) into timm BatchNorm weights, in place.

    InPlaceABN computes (x - mean) / sqrt(var + eps) · (|w| + eps) + b, so the sign of a trained weight is
    meaningless to it and released weights are often negative; BatchNorm uses w as is. Every ``.bn.weight``
    becomes ``abs(w) + 1e-5`` (in the file's dtype); bias and running statistics are unchanged. Files
    written with inplace_abn 1.0.x have no ``num_batches_tracked``: those get 0 (1.1.x files keep theirs).
    """
    for key in [k for k in state if k.startswith(prefix)]:
        if BN_WEIGHT.search(key):
            state[key] = state[key].abs() + INPLACE_ABN_EPS
        elif key.endswith(".bn.running_var"):
            state.setdefault(key[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return state


PE_KEY = "backbone.1.pe"
PE_TOLERANCE = 1e-4



def _safe_globals() -> list:
    """Harmless globals a training script may pickle next to the weights: its arguments, numpy scalars."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list = [argparse.Namespace, np.dtype, (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                     (core.multiarray.scalar, "numpy._core.multiarray.scalar")]
    for name in ("float64", "float32", "float16", "int64", "int32", "bool"):
        kind = type(np.dtype(name))
        allowed += [(kind, f"numpy.dtypes.{kind.__name__}")]
    return allowed


class OfficialCheckpointError(WeightsError):
    """An official checkpoint or config cannot be read or does not fit; the message names the file."""


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of an official ``checkpoint.pkl`` without running arbitrary pickled code.

    Uses ``torch.load(weights_only=True)``: only tensors, plain containers and a few harmless
    types (argparse.Namespace, numpy scalars) are accepted. The state dict is taken from
    ``state_dict`` or ``model`` (or the file itself); ``module.`` prefixes are stripped.
    """
    return state_dict_of(read_official_file(path), path)


def read_official_file(path: str | Path) -> object:
    """The object in a torch pickle, read with ``weights_only=True`` (see :func:`read_official_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: checkpoint not found")
    try:
        obj = load_torch_weights(path, _safe_globals())
    except UnsafeFileError as e:
        raise OfficialCheckpointError(str(e)) from None
    return obj


def state_dict_of(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint object: under ``state_dict`` or ``model``, or the object itself."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialCheckpointError(f"{path}: no state dict of tensors found (looked at 'state_dict', 'model')")
    return strip_prefixes(dict(obj))


def read_official_config(config: str | Path | Mapping) -> dict:
    """The official run arguments (``config_new.json`` / ``config.json``) as a dict."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OfficialCheckpointError(f"{path}: cannot read config ({e})") from None
    if not isinstance(data, dict):
        raise OfficialCheckpointError(f"{path}: expected a JSON object of arguments")
    return data


def model_config_from_official(config: Mapping, source: str = "config") -> ModelConfig:
    """Our ModelConfig (head "query2label") for an official Query2Label run configuration."""
    def need(key: str):
        if key not in config:
            raise OfficialCheckpointError(f"{source}: missing '{key}' (is this a Query2Label config_new.json?)")
        return config[key]

    name = need("backbone")
    if name not in BACKBONES:
        raise OfficialCheckpointError(f"{source}: backbone '{name}' is not supported; known: {', '.join(BACKBONES)}")
    if config.get("pre_norm", False):
        raise OfficialCheckpointError(f"{source}: pre_norm transformers are not supported (released models are "
                                      "post-norm)")
    if config.get("position_embedding", "sine") != "sine":
        raise OfficialCheckpointError(f"{source}: position_embedding '{config['position_embedding']}' is not "
                                      "supported (only 'sine')")
    ours, family, _ = BACKBONES[name]
    head_args = {
        "hidden_dim": int(need("hidden_dim")),
        "dim_feedforward": int(need("dim_feedforward")),
        "enc_layers": int(need("enc_layers")),
        "dec_layers": int(need("dec_layers")),
        "nheads": int(need("nheads")),
        "dropout": float(config.get("dropout", 0.1)),
        "keep_input_proj": bool(config.get("keep_input_proj", False)),
        "decoder_self_attn": bool(config.get("keep_other_self_attn_dec", False)),
        "first_decoder_self_attn": bool(config.get("keep_first_self_attn_dec", False)),
    }
    orid = bool(config.get("orid_norm", False))
    img_size = int(need("img_size"))
    backbone_args = {"img_size": img_size} if family == "swin" else {}
    return ModelConfig(
        backbone=ours, head="query2label", num_classes=int(need("num_class")), img_size=img_size,
        head_args=head_args, backbone_args=backbone_args,
        mean=(0.0, 0.0, 0.0) if orid else IMAGENET_MEAN, std=(1.0, 1.0, 1.0) if orid else IMAGENET_STD,
    )


def map_backbone_key(key: str, family: str) -> str | None:
    """Our name for an official ``backbone.0.*`` key, or None when the key is recomputed by us (dropped)."""
    rest = key[len("backbone.0."):]
    if family == "resnet":
        return "backbone." + rest if rest.startswith("body.") else ""
    if family == "tresnet":
        return "backbone." + rename_tresnet_key(rest) if rest.startswith("body.body.") else ""
    if family == "swin":
        if rest.endswith((".relative_position_index", ".attn_mask")):
            return None
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", rest)
        if m:
            rest = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        return "backbone.body." + rest
    if family == "cvt":
        return "backbone." + rest
    raise MlicError(f"unknown backbone family {family}")


def map_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig, family: str, stride: int, source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename official keys to ours; check and drop ``backbone.1.pe``.

    Raises OfficialCheckpointError when the file is not a Query2Label checkpoint, holds keys no rule
    maps, or its position encoding differs from ours (another encoding, or another input size).
    """
    state = strip_prefixes(dict(state_dict))
    if not any(k.startswith("transformer.") for k in state) or "query_embed.weight" not in state:
        raise OfficialCheckpointError(f"{source}: not a Query2Label checkpoint (no 'transformer.*' or "
                                      "'query_embed.weight' keys)")
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if key == PE_KEY:
            check_position_encoding(value, config, stride, source)
            continue
        new: str | None = ""
        for old, ours in HEAD_RULES:
            if key.startswith(old):
                new = ours + key[len(old):]
                break
        else:
            if key.startswith("backbone.0."):
                new = map_backbone_key(key, family)
        if new is None:
            continue
        if not new:
            unmapped.append(key)
            continue
        out[new] = value
    if PE_KEY not in state:
        raise OfficialCheckpointError(f"{source}: '{PE_KEY}' is missing (not a Query2Label checkpoint?)")
    if unmapped:
        raise OfficialCheckpointError(f"{source}: {len(unmapped)} keys fit no rule for backbone "
                                      f"'{config.backbone}': {unmapped[:4]}; check 'backbone' in the config")
    if family == "tresnet":
        inplace_abn_to_batchnorm(out, "backbone.")
    if family == "resnet":  # frozen BatchNorm has no counter; ours starts it at 0
        for key in [k for k in out if k.endswith(".running_mean")]:
            out.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


def check_position_encoding(pe: torch.Tensor, config: ModelConfig, stride: int, source: str) -> None:
    """The stored (1, d, S, S) encoding must be our sine encoding for the config's input size."""
    d = config.head_args["hidden_dim"]
    side = config.img_size // stride
    if pe.ndim != 4 or tuple(pe.shape) != (1, d, side, side):
        raise OfficialCheckpointError(
            f"{source}: {PE_KEY} has shape {tuple(pe.shape)}, but hidden_dim {d} and img_size {config.img_size} "
            f"(stride {stride}) give (1, {d}, {side}, {side}); the config does not match this checkpoint")
    ours = sine_position_encoding(side, side, d).T.reshape(1, d, side, side)
    diff = float((pe.float() - ours).abs().max())
    if not diff <= PE_TOLERANCE:
        raise OfficialCheckpointError(f"{source}: {PE_KEY} differs from the sine position encoding by {diff:.3g}; "
                                      "this checkpoint uses another position encoding")


def check_against_model(
    mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
) -> None:
    """Strict check: the same keys as ``expected`` (our model's state dict) and equal shapes."""
    check_state_dict(mapped, expected, source, "the model its config describes", error=OfficialCheckpointError)


def load_query2label(
    checkpoint: str | Path | Mapping[str, torch.Tensor], config: str | Path | Mapping,
) -> Classifier:
    """Build our Query2Label classifier from an official checkpoint, strictly.

    Args:
        checkpoint: path to ``checkpoint.pkl``, or a state dict with official key names.
        config: path to ``config_new.json``, or its dict (backbone, num_class, img_size,
            hidden_dim, dim_feedforward, enc_layers, dec_layers, nheads, keep_input_proj, orid_norm, ...).

    Returns:
        The Classifier (on CPU, eval mode): images (B, 3, img_size, img_size) normalised with
        ``model.config.mean/std`` -> logits (B, num_class).
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "state dict"
    cfg_source = str(config) if isinstance(config, (str, Path)) else "config"
    official = read_official_config(config)
    model_config = model_config_from_official(official, cfg_source)
    _, family, stride = BACKBONES[official["backbone"]]
    state = read_official_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    mapped = map_official_state_dict(state, model_config, family, stride, source)
    model = build_model(model_config)
    check_against_model(mapped, model.state_dict(), source)
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def load_release(folder: str | Path, classes: list[str] | None = None) -> tuple[Classifier, list[str], Path]:
    """Import an official release folder (checkpoint.pkl + config_new.json).

    Returns:
        (model in eval mode, class names — COCO's 80 unless given, the config file read).
    """
    folder = Path(folder)
    config_path = next((folder / n for n in ("config_new.json", "config.json") if (folder / n).is_file()), None)
    if config_path is None:
        raise OfficialCheckpointError(f"{folder}: no config_new.json (or config.json) beside checkpoint.pkl")
    model = load_query2label(folder / "checkpoint.pkl", config_path)
    k = model.config.num_classes
    if classes is None:
        if k != len(COCO_CLASSES):
            raise OfficialCheckpointError(f"{config_path}: num_class is {k}, not COCO's 80; pass the class names")
        classes = list(COCO_CLASSES)
    if len(classes) != k:
        raise OfficialCheckpointError(f"{config_path}: num_class is {k} but {len(classes)} class names were given")
    return model, classes, config_path


# --- ML-Decoder releases (Alibaba-MIIL/ML_Decoder, MODEL_ZOO.md) ---
# A release ``*.pth`` is a torch pickle: ``model`` holds the state dict (``body.*`` TResNet with InPlaceABN,
# ``head.decoder.*`` the 19 ML-Decoder tensors), ``idx_to_class`` the class names. Rules:
# - ``body.*`` -> ``backbone.body.body.*`` with the TResNet renames and the InPlaceABN rule above;
# - ``head.decoder.*`` -> ``head.decoder.*`` unchanged (our head keeps the official layout); a head in the
#   layout of the authors' timm fork (``head.duplicate_pooling``, ``head.embed_standart.*``, ...) is accepted too.
# The backbone is recognised by its blocks per stage, the head's sizes are read from its tensors.

ML_DECODER_BACKBONES: dict[tuple[int, ...], tuple[str, str, int]] = {
    (3, 4, 11, 3): ("TResNet-M", "tresnet_m", 224),
    (3, 4, 23, 3): ("TResNet-L", "tresnet_v2_l", 448),
    (3, 8, 34, 5): ("TResNet-XL", "tresnet_v2_xl", 640),
}
"""Blocks per stage -> (the authors' name, our backbone, their default input size)."""

ML_DECODER_RELEASE_SIZES: dict[str, int] = {
    "tresnet_m_COCO_224_84_2": 224, "tresnet_l_COCO__448_90_0": 448, "tresnet_xl_COCO_640_91_4": 640,
    "tresnet_m_open_images_200_groups_86_8": 224, "tresnet_l_stanford_card_96.41": 384,
}
"""Input size of each released file (MODEL_ZOO.md), by file stem."""

TIMM_FORK_HEAD = re.compile(r"^head\.(duplicate_pooling|duplicate_pooling_bias|embed_standart\.|query_embed\.)")


def map_ml_decoder_state_dict(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict, str, dict]:
    """Official ML-Decoder keys -> ours, InPlaceABN weights converted.

    Returns:
        (mapped state dict, our backbone name, head_args read from the tensors' shapes).
    """
    state = {TIMM_FORK_HEAD.sub(r"head.decoder.\1", k): v for k, v in strip_prefixes(dict(state)).items()}
    need = ("head.decoder.duplicate_pooling", "head.decoder.duplicate_pooling_bias", "head.decoder.query_embed.weight",
            "head.decoder.layers.0.linear1.weight", "body.conv1.0.weight")
    if any(k not in state for k in need):
        missing = next(k for k in need if k not in state)
        raise OfficialCheckpointError(f"{source}: not an ML-Decoder TResNet checkpoint (no '{missing}'); expected one "
                                      "of the authors' released .pth files (Alibaba-MIIL/ML_Decoder MODEL_ZOO.md)")
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = re.match(r"body\.layer(\d)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    layout = tuple(len(blocks.get(i, ())) for i in range(1, 5))
    if layout not in ML_DECODER_BACKBONES:
        raise OfficialCheckpointError(f"{source}: a TResNet with {list(layout)} blocks per stage is none of the "
                                      "released backbones (M [3, 4, 11, 3], L [3, 4, 23, 3], XL [3, 8, 34, 5])")
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if key.startswith("body."):
            out["backbone.body.body." + rename_tresnet_key(key[len("body."):])] = value
        elif key.startswith("head.decoder."):
            out[key] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise OfficialCheckpointError(f"{source}: {len(unmapped)} keys fit no ML-Decoder rule: {unmapped[:4]}")
    inplace_abn_to_batchnorm(out, "backbone.")
    groups, dim = state["head.decoder.query_embed.weight"].shape
    head_args = {"num_of_groups": int(groups), "decoder_embedding": int(dim),
                 "dim_feedforward": int(state["head.decoder.layers.0.linear1.weight"].shape[0])}
    return out, ML_DECODER_BACKBONES[layout][1], head_args


def load_ml_decoder(
    checkpoint: str | Path | Mapping, classes: list[str] | None = None, img_size: int | None = None,
) -> tuple[Classifier, list[str]]:
    """Build our TResNet + ML-Decoder classifier from an authors' release, strictly.

    Args:
        checkpoint: a released ``.pth`` (``model`` + ``idx_to_class``), or its dict / state dict.
        classes: label names in output order (default: the file's ``idx_to_class``, else COCO's 80).
        img_size: input size (default: the release's, from its file name, else the backbone's usual size).

    Returns:
        (classifier on CPU in eval mode: images (B, 3, s, s) in [0, 1], no normalisation -> (B, K) logits,
        class names).
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "state dict"
    obj = read_official_file(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    names = obj.get("idx_to_class") if isinstance(obj, Mapping) else None
    mapped, backbone, head_args = map_ml_decoder_state_dict(state_dict_of(obj, source), source)
    k = int(mapped["head.decoder.duplicate_pooling_bias"].shape[0])
    if classes is None:
        if isinstance(names, Mapping) and len(names) == k:
            classes = [str(v) for v in names.values()]  # their infer.py reads the values in this order
        elif k == len(COCO_CLASSES):
            classes = list(COCO_CLASSES)
        else:
            raise OfficialCheckpointError(f"{source}: holds {k} classes and no idx_to_class names; pass a class "
                                          f"names file with {k} lines (--classes)")
    if len(classes) != k:
        raise OfficialCheckpointError(f"{source}: holds weights for {k} classes but {len(classes)} class names were "
                                      f"given; pass {k} names, in the order the model was trained with")
    if img_size is None:
        stem = Path(source).stem
        img_size = ML_DECODER_RELEASE_SIZES.get(stem, next(v[2] for v in ML_DECODER_BACKBONES.values()
                                                           if v[1] == backbone))
    config = ModelConfig(backbone=backbone, head="ml_decoder", num_classes=k, img_size=int(img_size),
                         head_args=head_args, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # trained without
    model = build_model(config)
    check_against_model(mapped, model.state_dict(), source)
    model.load_state_dict(mapped, strict=True)
    return model.eval(), list(classes)
