"""Importer for the ML-Decoder releases (Alibaba-MIIL/ML_Decoder, MODEL_ZOO.md).

A release ``*.pth`` is a torch pickle: ``model`` holds the state dict (``body.*`` TResNet with InPlaceABN,
``head.decoder.*`` the 19 ML-Decoder tensors), ``idx_to_class`` the class names. Rules:

- ``body.*`` -> ``backbone.body.body.*``, then timm's TResNet checkpoint filter (renames, InPlaceABN weights
  -> ``abs(w) + 1e-5``; see :mod:`.tresnet`);
- ``head.decoder.*`` -> ``head.decoder.*`` unchanged (our head keeps the official layout); a head in the
  layout of the authors' timm fork (``head.duplicate_pooling``, ``head.embed_standart.*``, ...) is accepted too.

The backbone is recognised by its blocks per stage, the head's sizes are read from its tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from mlic.config import ModelConfig
from mlic.models.backbones import strip_prefixes
from mlic.models.classifier import Classifier, build_model
from mlic.models.official.coco import COCO_CLASSES
from mlic.models.official.release_file import (
    OfficialCheckpointError,
    check_against_model,
    read_official_file,
    state_dict_of,
)
from mlic.models.official.tresnet import tresnet_checkpoint_filter

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
            out["backbone.body." + key] = value  # renamed by the TResNet filter below
        elif key.startswith("head.decoder."):
            out[key] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise OfficialCheckpointError(f"{source}: {len(unmapped)} keys fit no ML-Decoder rule: {unmapped[:4]}")
    out = tresnet_checkpoint_filter(out, "backbone.body.")
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
