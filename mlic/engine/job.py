"""What a training job is (:class:`TrainJob`) and what it returns (:class:`RunResult`), for both modes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlic.config import ModelConfig, TrainConfig
from mlic.data.splits import Splits

MODES = ("finetune", "linear", "linear-init")
"""finetune: backbone + head end to end; linear: a linear head on cached backbone features; linear-init:
linear, then finetune starting from its head and its loss state (Cole et al.'s ``linear_init``)."""


@dataclass
class TrainJob:
    """One training run, in either mode: everything :func:`mlic.engine.run.run` needs."""

    model: ModelConfig
    """The classifier to build (num_classes equals the data's)."""
    train: TrainConfig
    """Optimisation settings (the fine-tuning phase's, under linear-init)."""
    splits: Splits
    """train (observed labels used when present), val (clean labels), test (optional)."""
    out: Path
    """The run folder."""
    mode: str = "finetune"
    """One of :data:`MODES`."""
    linear: TrainConfig | None = None
    """Under ``linear-init``: the settings of the linear phase (``train`` then holds the fine-tuning's). Under
    ``linear``, ``train`` itself holds the probe's (:meth:`TrainConfig.linear_defaults`)."""
    pretrained: str | None = None
    """Backbone weights: a local file, ``timm`` (the backbone's default pretrained tag) or ``hf-hub:ORG/NAME``."""
    init_from: Path | None = None
    """A finished run whose model weights and loss state (e.g. ROLE's estimated labels) the run starts from."""
    resume: bool = False
    """Continue from ``out/last.pt``."""
    checkpoint_every: float | None = None
    """Minutes between checkpoints inside an epoch (None: only at epoch ends)."""
    strict_images: bool = False
    """Stop at the first unreadable image."""
    max_bad_images: float = 0.01
    """Unreadable images tolerated per split: a share (< 1) or a count (≥ 1)."""
    progress: bool = True
    """Show progress bars."""
    log: Callable = print
    """Where lines are printed (rank 0 only)."""
    log_to: str | None = None
    """Also write the training curves there: ``"tensorboard"`` (event files in the run folder) or None."""
    features_dir: Path | None = None
    """The feature cache of ``--mode linear`` shared with other runs (one extracts, the others wait and read);
    None: ``out/features``."""
    teacher: str | None = None
    """A frozen teacher's weights (``--teacher``: CLIP in OpenAI / open_clip / Hugging Face layout, or an mlic model
    folder with ``kind=classifier``) whose pseudo-labels the loss gets (mlic.engine.teaching); None: no teacher."""
    teacher_args: dict = field(default_factory=dict)
    """``--teacher-arg`` settings: rule, its thresholds, view maker, prompt, dtype, ... (mlic.engine.teaching)."""
    teacher_cache: bool = True
    """True: one teacher pass before training, pseudo-labels kept (and resumed); False: every step, on the step's
    own views (the official schedule of VLPL and AEVLP)."""
    data: Path | None = None
    """The data folder (where ``mlic pseudo-label`` leaves pseudo-labels); None for MultiDigits."""


@dataclass
class RunResult:
    """What a finished run returns, whatever the mode."""

    out_dir: Path
    best_epoch: int
    """1-based epoch kept by validation mAP."""
    best_val_map: float
    test_metrics: dict | None
    """Metrics table of the best model on test (None without test, or on ranks other than 0)."""
    history: list[dict]
    """One record per epoch (the lines of metrics.jsonl)."""
    bad_images: int = 0
    """Unreadable training images skipped (last epoch)."""
    test_scores: np.ndarray | None = None
    """(N, K) test scores, NaN rows for unreadable images."""
    seconds: float = 0.0
    """Wall-clock time of the training."""
    best: object = None
    """The kept epoch as :func:`mlic.engine.loop.drive` holds it (its snapshot and thresholds)."""


def make_job(
    data: str | Path | None = None, out: str | Path | None = None, backbone: str | None = None,
    head: str | None = None, head_args: dict | None = None, img_size: int | None = None,
    pretrained: str | Path | None = None, recipe: str | Path | None = None, mode: str | None = None,
    loss: str | None = None, loss_args: dict | None = None, observe: str | None = None, observe_seed: int = 1200,
    epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
    weight_decay: float | None = None, ema: float | None = None, amp: str | None = None, augment: str | None = None,
    hflip: bool | None = None, freeze: list[str] | None = None, workers: int | None = None,
    decode_device: str | None = None, seed: int | None = None, val_fraction: float = 0.2,
    digits_size: str | None = None, resume: bool = False, overwrite: bool = False,
    init_from: str | Path | None = None, linear_args: dict | None = None, checkpoint_every: float | None = None,
    threads: int | None = None, strict_images: bool = False, max_bad_images: str | float = "1%",
    quiet: bool = False, log: Callable = print, log_to: str | None = None, features_dir: str | Path | None = None,
    teacher: str | Path | None = None, teacher_args: dict | None = None, teacher_cache: bool = True,
) -> TrainJob:
    """The job ``mlic train`` runs, from its options: what the CLI and :func:`mlic.train` both call.

    Every argument is the ``mlic train`` option of the same name (``--head-arg`` / ``--loss-arg`` /
    ``--linear-arg`` as dicts) with the same default. Here live the decisions below the command line: a
    recipe's sections under the options given, the MultiDigits demo's settings when no ``data`` is given,
    the linear phase's settings, impossible settings refused before any work, and the run folder claimed
    (its lock taken, on rank 0 only).

    Raises:
        MlicError: an impossible or contradictory setting, or a run folder that cannot be claimed; one line.
    """
    import time

    from mlic.config import read_recipe
    from mlic.data.images import parse_bad_limit
    from mlic.data.splits import training_splits
    from mlic.engine import dist
    from mlic.engine.run_folder import claim_run_dir
    from mlic.errors import MlicError

    recipe_sections = read_recipe(recipe) if recipe else {}
    mode = mode or recipe_sections.get("mode") or "finetune"
    if mode not in MODES:
        raise MlicError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if resume and out is None:
        raise MlicError("--resume needs --out: the run folder to continue")
    if not 0 < val_fraction < 1:
        raise MlicError(f"--val-fraction {val_fraction}: choose a share between 0 and 1, e.g. 0.2")
    if log_to is not None:
        from mlic.engine.tensorboard import check_log_to

        check_log_to(log_to)
    if checkpoint_every is not None and checkpoint_every < 0:
        raise MlicError(f"--checkpoint-every {checkpoint_every}: give minutes, 0 or more")
    if mode == "linear":
        ignored = {"--weight-decay": weight_decay, "--ema": ema, "--amp": amp, "--augment": augment,
                   "--hflip/--no-hflip": hflip, "--freeze": freeze, "--resume": resume or None,
                   "--init-from": init_from, "--checkpoint-every": checkpoint_every, "--decode-device": decode_device}
        given = [name for name, value in ignored.items() if value is not None]
        if given:
            raise MlicError(f"{', '.join(given)}: not used by --mode linear (a head trained on cached features); "
                            "drop them or use --mode finetune")
    bad_limit = parse_bad_limit(max_bad_images) if isinstance(max_bad_images, str) else float(max_bad_images)
    main = dist.is_main_process()
    echo = log if main else (lambda *a, **k: None)  # one voice under torchrun or srun
    model_args = dict(recipe_sections.get("model") or {})
    train_args = dict(recipe_sections.get("train") or {})
    linear = dict(recipe_sections.get("linear") or {})
    model_args.update({k: v for k, v in {"backbone": backbone, "head": head, "img_size": img_size}.items()
                       if v is not None})
    model_args.setdefault("head_args", {}).update(head_args or {})
    given_train = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "ema": ema,
                   "amp": amp, "augment": augment, "hflip": hflip, "freeze": freeze, "workers": workers,
                   "threads": threads, "seed": seed, "loss": loss, "decode_device": decode_device}
    if mode == "linear":  # epochs, batch size and lr set the probe
        linear.update({k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items()
                       if v is not None})
    train_args.update({k: v for k, v in given_train.items() if v is not None})
    train_args.setdefault("loss_args", {}).update(loss_args or {})
    linear.update(linear_args or {})
    if data is None and mode != "linear":  # tuned for the 5-minute demo on 2 cores
        train_args.setdefault("hflip", False)
        train_args.setdefault("epochs", 15)
        train_args.setdefault("lr", 4e-3)
    train_cfg = TrainConfig.from_dict(train_args)  # impossible settings are refused here, before any work
    if mode != "linear":
        from mlic.data.gpu_decode import check_decode_device

        check_decode_device(train_cfg.decode_device)  # before the run folder is claimed
    ModelConfig.from_dict({**model_args, "num_classes": 1})

    def linear_config(num_images: int | None) -> TrainConfig:
        """The linear phase's settings: the probe's fast defaults, the loss and seed of the run, the recipe's
        linear: section, then --linear-arg (and, under --mode linear, --epochs / --batch-size / --lr)."""
        shared = {k: train_args[k] for k in ("loss", "loss_args", "seed", "estimator_lr_mult", "workers", "threads")
                  if k in train_args}
        return TrainConfig.linear_defaults(num_images, **{**shared, **linear})

    if mode != "finetune":
        linear_config(None)
    out = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if checkpoint_every is None and data is not None:
        checkpoint_every = 10.0
    from mlic.engine.teaching import check_teacher_options

    check_teacher_options(train_cfg.loss, train_cfg.loss_args, teacher, teacher_cache, data, mode)  # before the claim
    if main:
        claim_run_dir(out, resume=resume, overwrite=overwrite)
    splits = training_splits(Path(data) if data is not None else None, observe, observe_seed, val_fraction,
                             digits_size, echo)
    model_args["num_classes"] = splits.train.num_classes
    model_cfg = ModelConfig.from_dict(model_args)
    echo(f"model: {model_cfg.backbone} + {model_cfg.head} head, {model_cfg.num_classes} classes, "
         f"{model_cfg.img_size}px; loss {train_cfg.loss}; mode {mode}; run folder {out}")
    if mode == "linear":
        train_cfg, linear_cfg = linear_config(len(splits.train)), None
    else:
        linear_cfg = linear_config(len(splits.train)) if mode == "linear-init" else None
    return TrainJob(model_cfg, train_cfg, splits, out, mode=mode, linear=linear_cfg,
                    pretrained=str(pretrained) if pretrained else None,
                    init_from=Path(init_from) if init_from is not None else None, resume=resume,
                    checkpoint_every=checkpoint_every if mode != "linear" else None, strict_images=strict_images,
                    max_bad_images=bad_limit, progress=not quiet, log=echo, log_to=log_to,
                    features_dir=Path(features_dir) if features_dir is not None else None,
                    teacher=str(teacher) if teacher is not None else None, teacher_args=dict(teacher_args or {}),
                    teacher_cache=teacher_cache, data=Path(data) if data is not None else None)
