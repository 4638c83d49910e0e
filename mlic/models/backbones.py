"""Backbones: modules mapping images (B, 3, H, W) to feature maps (B, C, h, w).

Any timm model name works, with or without a pretrained tag (``TimmBackbone``); in-house backbones that
timm lacks are registered in ``BACKBONES``. Pretrained weights (:func:`resolve_pretrained`) are a local
file, ``timm`` (the weights of the backbone's timm tag) or ``hf-hub:ORG/NAME[@REVISION]``, the last two
through huggingface_hub's download and cache; each resolves to one local file, loaded through timm's
checkpoint filter for the model and a strict key check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import timm
import torch
from torch import nn

from mlic.errors import MlicError
from mlic.models.weights import (
    HUB_WEIGHT_FILES,
    PretrainedWeights,
    WeightsError,
    check_state_dict,
    hub_weights,
    local_weights,
    read_state_dict,
    strip_prefixes,
)
from mlic.registry import BACKBONES, register_backbone


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load ImageNet-style weights into a timm body built outside timm's factory, strictly except its classifier.

    For bodies without a timm name (``tresnet_v2_xl``); named timm models load through :func:`load_timm_weights`.
    Keys of the model's own classifier (``default_cfg['classifier']``) may be absent or extra;
    any other missing or unexpected key, or a shape mismatch, is an error naming the file.
    """
    state = strip_prefixes(read_state_dict(path))
    is_head = _head_test(model)
    state = {k: v for k, v in state.items() if not is_head(k)}
    check_state_dict(state, model, path, "this backbone; check --backbone", ignore=is_head)
    model.load_state_dict(state, strict=False)


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "fc")
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _head_test(model: nn.Module) -> Callable[[str], bool]:
    heads = _classifier_names(model)
    return lambda k: any(k == h or k.startswith(h + ".") for h in heads)


def load_timm_weights(body: nn.Module, name: str, path: str | Path, **kwargs) -> None:
    """Load a weight file into ``body`` (timm model ``name`` built with num_classes=0, global_pool="") as timm would.

    timm builds the model as the weights were trained (their classifier's width, default pooling) with
    ``pretrained=True`` from the file's tensors, so its own checkpoint filter for that model (key renames,
    position-embedding resampling, input-conv adaptation) applies and its load is strict (the classes match);
    ``body`` then takes each of its tensors from that model, checked strictly. What the body lacks (the
    classifier, a pooling head) is dropped.

    Args:
        body: the headless model to fill.
        name: its timm name, tag included.
        path: a local .safetensors or torch file of timm-format (or filter-convertible) weights.
        **kwargs: the arguments ``body`` was built with (img_size, drop_path_rate, ...).

    Raises:
        WeightsError: one line naming the file and the misfit keys.
    """
    state = strip_prefixes(read_state_dict(path))
    rows = [state[h + ".weight"].shape[0] for h in _classifier_names(body) if h + ".weight" in state]
    num_classes = int(rows[0]) if rows else 0
    what = f"backbone {name}; check --backbone"
    overlay = {"state_dict": state, "num_classes": num_classes, "label_offset": 0}
    try:
        full = timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    except Exception as e:  # noqa: BLE001 - body was built from the same name and arguments: the weights misfit
        raise WeightsError(f"{path}: weights do not fit {what} ({_load_error(e)})") from None
    del state, overlay
    trained = full.state_dict()
    state = {k: trained[k] for k in body.state_dict() if k in trained}
    body.load_state_dict(check_state_dict(state, body, path, what))


def _load_error(e: Exception) -> str:
    """torch's multi-line strict-load error (or a checkpoint filter's failure) as one short clause."""
    text = str(e)
    parts = []
    for kind in ("Missing", "Unexpected"):
        m = re.search(kind + r' key\(s\) in state_dict: (.*?)\.\s*$', text, re.M)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {kind.lower()}: {keys[:3]}{' ...' if len(keys) > 3 else ''}")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                       r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", text)
    if sizes:
        detail = [f"{k} ({a}) vs ({b})" for k, a, b in sizes[:3]]
        parts.append(f"{len(sizes)} shape mismatch: {detail}{' ...' if len(sizes) > 3 else ''}")
    if parts:
        return "; ".join(parts)
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(e).__name__}: {first}"


class TimmBackbone(nn.Module):
    """A timm model cut before its pooling: forward gives (B, C, h, w) feature maps.

    ``pretrained``: a local weight file (:func:`build_backbone` resolves ``timm`` / ``hf-hub:`` to one).
    ``body``: a timm model built by the caller (one timm has no registered name for), used instead of ``name``.

    Channels-last (Swin, NHWC) and token outputs (ViT, B×N×C) are turned into NCHW maps.
    """

    def __init__(self, name: str, pretrained: str | Path | None = None, body: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__()
        try:
            self.body = body or timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        except RuntimeError as e:
            raise MlicError(f"unknown backbone '{name}': {e}") from None
        if pretrained and body is not None:
            load_backbone_weights(self.body, pretrained)
        elif pretrained:
            load_timm_weights(self.body, name, pretrained, **kwargs)
        self.num_channels = int(self.body.num_features)
        self.num_prefix_tokens = int(getattr(self.body, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body.forward_features(x)
        if f.ndim == 3:  # tokens (B, N, C): drop class/register tokens, fold the rest into a grid
            f = f[:, self.num_prefix_tokens:]
            side = int(round(f.shape[1] ** 0.5))
            return f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, -1)
        if f.shape[1] != self.num_channels and f.shape[-1] == self.num_channels:
            f = f.permute(0, 3, 1, 2)
        return f.contiguous() if f.ndim == 4 and not f.is_contiguous() else f


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitNet(nn.Module):
    """A small CNN (≈0.28M parameters, stride 8) that trains from scratch in minutes on 2 CPU cores.

    The default backbone for MultiDigits. Output: (B, width*4, H/8, W/8).
    """

    def __init__(self, width: int = 32, pretrained: str | Path | None = None) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            conv_bn_relu(3, w, 2), conv_bn_relu(w, 2 * w, 2), conv_bn_relu(2 * w, 2 * w, 1),
            conv_bn_relu(2 * w, 4 * w, 2), conv_bn_relu(4 * w, 4 * w, 1),
        )
        self.num_channels = 4 * w
        if pretrained:
            state = strip_prefixes(read_state_dict(pretrained))
            self.load_state_dict(check_state_dict(state, self, pretrained, "digitnet"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


register_backbone("digitnet")(DigitNet)


@register_backbone("tresnet_v2_xl")
def tresnet_v2_xl(pretrained: str | Path | None = None, **kwargs) -> TimmBackbone:
    """TResNet-XL as ML-Decoder's authors built it: layers [3, 8, 34, 5], width 1.0, Bottleneck blocks, 2048 channels.

    timm's class builds it (``v2=True``) but registers no name for it (its ``tresnet_xl`` is another network:
    [4, 5, 24, 3], width 1.3, 2656 channels).
    """
    from timm.models.tresnet import TResNet

    body = TResNet(layers=[3, 8, 34, 5], width_factor=1.0, v2=True, num_classes=0, global_pool="", **kwargs)
    body.pretrained_cfg = body.default_cfg = {"classifier": "head.fc"}  # what timm's factory sets for tresnets
    return TimmBackbone("tresnet_v2_xl", pretrained=pretrained, body=body)


def build_backbone(name: str, pretrained: str | Path | PretrainedWeights | None = None, **kwargs) -> nn.Module:
    """An in-house backbone by name, else the timm model of that name (tag allowed); has ``.num_channels``.

    ``pretrained``: what :func:`resolve_pretrained` takes (a local file, ``timm``, ``hf-hub:ORG/NAME[@REVISION]``),
    or the :class:`PretrainedWeights` it returned (so a caller that records them resolves and hashes once).
    """
    if name not in BACKBONES and not timm.is_model(name):
        raise MlicError(f"unknown backbone '{name}': neither in-house ({', '.join(sorted(BACKBONES))}) nor a timm "
                         "model name (see timm.list_models())")
    weights = None
    if pretrained:
        weights = pretrained if isinstance(pretrained, PretrainedWeights) else resolve_pretrained(pretrained, name)
    path = weights.path if weights else None
    if name in BACKBONES:
        return BACKBONES[name](pretrained=path, **kwargs)
    return TimmBackbone(name, pretrained=path, **kwargs)


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")
"""Suffixes that make an absent ``--pretrained`` a missing file rather than an unknown spec."""


def resolve_pretrained(spec: str | Path | PretrainedWeights, backbone: str) -> PretrainedWeights:
    """Resolve a ``--pretrained`` spec for ``backbone`` to one local file, downloading it into the Hub cache if needed.

    Args:
        spec: a local weight file (.safetensors or torch; a ``Path`` is always a file); ``timm``: the weights of
            the backbone's timm tag (``resnet50.a1_in1k``; a bare ``resnet50`` means timm's default tag), fetched
            as timm does, from its ``hf_hub_id``; ``hf-hub:ORG/NAME[@REVISION]``: a Hub repository of timm-format
            weights (model.safetensors or pytorch_model.bin). Both honour HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE
            as set when this is called. Already resolved PretrainedWeights pass through.
        backbone: the backbone the weights are for; in-house ones take a file or ``hf-hub:``, not ``timm``.

    Returns:
        The file with its ``source`` and ``sha256``, to load (``build_model(config, pretrained=weights)``) and record.

    Raises:
        WeightsError: one line saying what to pass or download instead.
    """
    if isinstance(spec, PretrainedWeights):
        return spec
    text = str(spec)
    if isinstance(spec, str) and text == "timm":
        return _timm_weights(backbone)
    if isinstance(spec, str) and text.startswith("hf-hub:"):
        repo, at, revision = text[len("hf-hub:"):].partition("@")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or (at and not revision):
            raise WeightsError(f"--pretrained {text}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
        return hub_weights(repo, revision or None, text)
    path = Path(text).expanduser()
    if isinstance(spec, Path) or path.exists() or path.suffix in WEIGHT_SUFFIXES or os.sep in text:
        return local_weights(path)
    timm_choice = "" if backbone in BACKBONES else f", `timm` ({backbone}'s timm weights)"
    raise WeightsError(f"--pretrained '{text}': neither an existing file, `timm` nor `hf-hub:ORG/NAME[@REVISION]`; "
                       f"pass a weight file (.safetensors or torch){timm_choice} or hf-hub:ORG/NAME")


def _timm_weights(backbone: str) -> PretrainedWeights:
    """The weights timm's ``pretrained=True`` loads for ``backbone``, from its pretrained_cfg's ``hf_hub_id``."""
    if backbone in BACKBONES:
        raise WeightsError(f"--pretrained timm: '{backbone}' is an in-house backbone, timm has no weights for it; "
                           f"pass --pretrained FILE or hf-hub:ORG/NAME (a repository of {backbone} weights)")
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as e:  # an unknown tag
        raise MlicError(f"unknown backbone '{backbone}': {e}") from None
    if cfg is None:
        raise MlicError(f"unknown backbone '{backbone}': neither in-house ({', '.join(sorted(BACKBONES))}) nor a "
                        "timm model name (see timm.list_models())")
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        weights = hub_weights(repo, revision or None, name, files)
        return replace(weights, source=f"timm:{name} ({weights.source})")
    if cfg.url:
        raise WeightsError(f"{name}: timm has these weights only at {cfg.url}, not on the Hugging Face Hub; "
                           "download that file and pass --pretrained FILE")
    tagged = timm.list_pretrained(f"{cfg.architecture}.*")[:3]
    hint = f", or a tag that has them: --backbone {' / '.join(tagged)}" if tagged else ""
    raise WeightsError(f"{name}: timm has no pretrained weights for this model; pass --pretrained FILE or "
                       f"hf-hub:ORG/NAME{hint}")
