"""Importer for the official Query2Label releases (SlongLiu/query2labels).

A release folder holds ``checkpoint.pkl`` (a torch pickle whose ``state_dict`` has the weights,
keys possibly prefixed ``module.``) and ``config_new.json`` (the run's arguments). Keys are mapped
to ours by explicit rules, one set per backbone family:

- head: ``transformer.encoder.*`` -> ``head.encoder.*``, ``transformer.decoder.*`` ->
  ``head.decoder.*``, ``input_proj.*`` / ``query_embed.*`` / ``fc.*`` -> ``head.*``.
- ``backbone.1.pe`` (the stored sine encoding for the trained size) is compared with the
  encoding we compute and dropped.
- ResNet (torchvision names, frozen BatchNorm): ``backbone.0.body.*`` -> ``backbone.body.*``;
  the BatchNorm ``num_batches_tracked`` counters the frozen layers lack are set to 0.
- TResNet / TResNet v2: ``backbone.0.body.body.*`` -> ``backbone.body.body.*``, then timm's TResNet
  checkpoint filter (renames, InPlaceABN weights -> ``abs(w) + 1e-5``; see :mod:`.tresnet`).
- Swin: ``backbone.0.*`` -> ``backbone.body.*`` with ``layers.i.downsample`` ->
  ``layers.(i+1).downsample``; ``relative_position_index`` and ``attn_mask`` (recomputed) dropped.
- CvT: ``backbone.0.*`` -> ``backbone.*`` (our CvT has the official layout).

After mapping, the key set and every shape must equal our model's exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from mlic.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from mlic.errors import MlicError
from mlic.models.backbones import strip_prefixes
from mlic.models.classifier import Classifier, build_model
from mlic.models.heads import sine_position_encoding
from mlic.models.official.coco import COCO_CLASSES
from mlic.models.official.release_file import OfficialCheckpointError, check_against_model, read_official_checkpoint
from mlic.models.official.tresnet import tresnet_checkpoint_filter

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

PE_KEY = "backbone.1.pe"
PE_TOLERANCE = 1e-4



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
        return "backbone." + rest if rest.startswith("body.body.") else ""  # renamed by the TResNet filter
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
        out = tresnet_checkpoint_filter(out, "backbone.body.")
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
