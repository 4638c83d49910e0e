"""Backbones: modules mapping images (B, 3, H, W) to feature maps (B, C, h, w).

Any timm model name works (``TimmBackbone``); weights come only from a local file
(``pretrained=PATH``), never from a hub. In-house backbones that timm lacks are registered in
``BACKBONES``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from mlic.errors import MlicError
from mlic.models.weights import WeightsError, check_state_dict, read_state_dict, strip_prefixes  # noqa: F401
from mlic.registry import registrar

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


register_backbone = registrar(BACKBONES, "backbone")
"""Class decorator adding a backbone under a name; a name registered twice is refused."""


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load ImageNet-style weights into a timm model strictly, except for its classifier.

    Keys of the model's own classifier (``default_cfg['classifier']``) may be absent or extra;
    any other missing or unexpected key, or a shape mismatch, is an error naming the file.
    """
    state = strip_prefixes(read_state_dict(path))
    classifier = getattr(model, "default_cfg", {}).get("classifier", "fc") if hasattr(model, "default_cfg") else "fc"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    state = {k: v for k, v in state.items() if not is_head(k)}
    check_state_dict(state, model, path, "this backbone; check --backbone", ignore=is_head)
    model.load_state_dict(state, strict=False)


class TimmBackbone(nn.Module):
    """A timm model cut before its pooling: forward gives (B, C, h, w) feature maps.

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
        if pretrained:
            load_backbone_weights(self.body, pretrained)
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


def build_backbone(name: str, pretrained: str | Path | None = None, **kwargs) -> nn.Module:
    """An in-house backbone by name, else the timm model of that name; has ``.num_channels``."""
    if name in BACKBONES:
        return BACKBONES[name](pretrained=pretrained, **kwargs)
    if name not in timm.list_models():
        raise MlicError(f"unknown backbone '{name}': neither in-house ({', '.join(sorted(BACKBONES))}) nor a timm "
                         "model name (see timm.list_models())")
    return TimmBackbone(name, pretrained=pretrained, **kwargs)


from mlic.models import cvt as _cvt  # noqa: E402,F401  (registers the in-house "cvt_w24")
