"""Typed configs. A checkpoint stores its ModelConfig, so a checkpoint rebuilds its own model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_fields(cls: type, d: dict, what: str) -> dict:
    """A copy of ``d`` after checking that every key is a field of the dataclass ``cls``."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config fields: {sorted(unknown)}")
    return dict(d)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a classifier."""

    backbone: str = "digitnet"
    """timm model name (any) or an in-house backbone ("digitnet", "cvt_w24")."""
    head: str = "linear"
    """Head name: "linear", "query2label", "mldecoder"."""
    num_classes: int = 10
    """Number of labels K."""
    img_size: int = 64
    """Square input size the model is trained and evaluated at."""
    head_args: dict = field(default_factory=dict)
    """Keyword arguments of the head (e.g. hidden_dim, enc_layers for query2label)."""
    backbone_args: dict = field(default_factory=dict)
    """Keyword arguments passed to the backbone constructor (e.g. drop_path_rate)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean of the input normalisation (0,0,0 with std 1,1,1 for 'orid_norm')."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std of the input normalisation."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = check_fields(cls, d, "model")
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI's options, or a YAML recipe)."""

    epochs: int = 12
    """Passes over the training set."""
    batch_size: int = 64
    """Images per optimisation step (per process under DDP)."""
    lr: float = 2e-3
    """Peak learning rate of the OneCycle schedule (AdamW)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (not applied to norms and biases)."""
    pct_start: float = 0.2
    """Fraction of the steps spent warming the learning rate up (OneCycle)."""
    loss: str = "bce"
    """Loss name (see mlic.losses): bce, focal, asl, an, an_ls, wan, epr, role, ..."""
    loss_args: dict = field(default_factory=dict)
    """Keyword arguments of the loss."""
    ema: float = 0.0
    """EMA decay of the weights (0 disables; Query2Label uses 0.9997)."""
    clip_grad: float = 10.0
    """Gradient-norm clipping threshold (0 disables)."""
    amp: str = "auto"
    """Mixed precision: "auto" (bf16/fp16 on CUDA, fp32 on CPU), "bf16", "fp16", "off"."""
    workers: int = 2
    """DataLoader worker processes."""
    seed: int = 0
    """Seed of initialisation, data order and augmentation."""
    augment: str = "light"
    """Train-time augmentation: "none", "light" (flip + random resized crop), "randaugment" (+ Cutout)."""
    hflip: bool = True
    """Random horizontal flips (turn off for data where left/right matters, like digits)."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name prefixes of the backbone that stay frozen (e.g. conv1, layer1)."""
    estimator_lr_mult: float = 10.0
    """Learning-rate multiplier of ROLE's label estimator."""
    channels_last: bool = True
    """Use channels-last memory format (faster convolutions on many CPUs and GPUs)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**check_fields(cls, d, "train"))


def load_recipe(path: str | Path) -> tuple[dict, dict]:
    """Read a YAML recipe with optional ``model:`` and ``train:`` sections; returns the two dicts."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read recipe ({e})") from None
    if not isinstance(data, dict) or set(data) - {"model", "train", "description"}:
        raise ValueError(f"{path}: a recipe holds only 'model', 'train' and 'description' sections")
    return dict(data.get("model") or {}), dict(data.get("train") or {})
