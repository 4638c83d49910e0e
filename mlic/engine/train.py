"""The training loop: one function you can read top to bottom.

forward → loss → non-finite guard → backward → unscale → clip → step → schedule → EMA, then
per epoch: evaluate on validation, log a JSONL line, save resume state, keep the best model.
Written for torchrun + DDP: a handle on the unwrapped model, a DistributedSampler with
``set_epoch``, saving on rank 0 only.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from mlic.config import ModelConfig, TrainConfig
from mlic.data.images import BadImageCheck, ImageDataset, build_transform, make_loader, normalize
from mlic.data.labelset import LabelSet, atomic_write_bytes
from mlic.engine import dist
from mlic.engine.checkpoint import labelset_fingerprint, load_state, save_model, save_state, settings_differences
from mlic.engine.evaluate import autocast_dtype, evaluate_scores, predict_loader
from mlic.losses import build_loss
from mlic.metrics import best_thresholds
from mlic.models.classifier import build_model


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class EMA:
    """Exponential moving average of a model's parameters and buffers, with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1 - d)
            else:
                e.copy_(m)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_defaults(loss_name: str, loss_args: dict, train_set: LabelSet) -> dict:
    """Fill the size arguments a loss asks for (num_images, num_classes, expected_positives) from the data."""
    from mlic.losses import LOSSES

    cls = LOSSES.get(loss_name.lower().replace("-", "_"))
    params = inspect.signature(cls.__init__).parameters if cls else {}
    args = dict(loss_args)
    if "num_images" in params:
        args.setdefault("num_images", len(train_set))
    if "num_classes" in params:
        args.setdefault("num_classes", train_set.num_classes)
    if "expected_positives" in params and "expected_positives" not in args:
        known = np.asarray(train_set.targets)
        # k, the mean number of positives per image: a data-set statistic, as Cole et al. use it
        args["expected_positives"] = float((known == 1).sum(1).mean())
    return args


def param_groups(model: nn.Module, loss: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weights with decay, norms/biases without, the loss's own parameters at lr × multiplier."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr}]
    extra = [p for p in loss.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0, "lr": cfg.lr * cfg.estimator_lr_mult})
    return [g for g in groups if g["params"]]


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Freeze backbone parameters whose name (relative to the backbone) starts with a prefix; returns the count."""
    count = 0
    for name, p in model.backbone.named_parameters():
        bare = name.removeprefix("body.")
        if any(bare == pre or bare.startswith(pre + ".") for pre in prefixes):
            p.requires_grad_(False)
            count += 1
    if prefixes and count == 0:
        raise TrainingError(f"--freeze {prefixes}: no backbone parameter has that prefix")
    return count


@dataclass
class RunResult:
    """What a finished run returns."""

    out_dir: Path
    best_epoch: int
    best_val_map: float
    test_metrics: dict | None
    history: list[dict]
    bad_images: int


def train(
    model_cfg: ModelConfig, cfg: TrainConfig, train_set: LabelSet, val_set: LabelSet, out_dir: str | Path,
    test_set: LabelSet | None = None, resume: bool = False, pretrained: str | None = None,
    strict_images: bool = False, log=print, progress: bool = True, max_bad_images: float = 0.01,
) -> RunResult:
    """Train a classifier, keeping the best epoch by validation mAP (clean labels), and evaluate it on test.

    Args:
        model_cfg: the model to build (num_classes must equal the data's).
        cfg: optimisation settings.
        train_set: training rows; ``observed`` labels are used when present.
        val_set: validation rows; evaluated with their ``targets``.
        out_dir: run directory (model, resume state, metrics.jsonl).
        test_set: evaluated once with the best weights at the end.
        resume: continue from ``out_dir/last.pt``.
        pretrained: local backbone weight file.
        strict_images: fail at the first unreadable image instead of skipping it.
        max_bad_images: unreadable images tolerated per split, a share (< 1) or a count (≥ 1); more stops the
            run (:class:`BadImageCheck`), as does a split with no readable image.
        log: where to print lines (rank 0 only).
        progress: show progress bars.
    """
    out_dir = Path(out_dir)
    rank, world, device = dist.init_distributed()
    main = rank == 0
    say = log if main else (lambda *a, **k: None)
    if model_cfg.num_classes != train_set.num_classes:
        raise TrainingError(f"the model has {model_cfg.num_classes} outputs but the data has "
                            f"{train_set.num_classes} classes")
    seed_everything(cfg.seed + rank)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = build_model(model_cfg, pretrained=pretrained)
    if cfg.freeze:
        say(f"froze {freeze(model, cfg.freeze)} backbone tensors ({', '.join(cfg.freeze)})")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    loss_fn = build_loss(cfg.loss, **loss_defaults(cfg.loss, cfg.loss_args, train_set)).to(device)
    if hasattr(loss_fn, "init_estimator"):  # ROLE: the label estimator starts from the observed labels
        loss_fn.init_estimator(np.asarray(train_set.train_targets), seed=cfg.seed)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    net = DistributedDataParallel(model) if world > 1 else model

    train_data = ImageDataset(train_set, build_transform(model_cfg.img_size, True, cfg.augment, cfg.hflip))
    sampler = DistributedSampler(train_data, shuffle=True, seed=cfg.seed) if world > 1 else None
    train_loader = make_loader(train_data, cfg.batch_size, shuffle=True, workers=cfg.workers, sampler=sampler,
                               drop_last=len(train_data) > cfg.batch_size, seed=cfg.seed)
    val_data = ImageDataset(val_set, build_transform(model_cfg.img_size, False), targets=val_set.targets)
    val_loader = make_loader(val_data, cfg.batch_size * 2, workers=cfg.workers)

    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, cfg), lr=cfg.lr)
    steps_per_epoch = max(1, len(train_loader))
    total_steps = cfg.epochs * steps_per_epoch
    if total_steps >= 4:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
            pct_start=min(0.5, max(cfg.pct_start, 1.5 / total_steps)), anneal_strategy="cos")  # ≥ 1 warm-up step
    else:  # too few steps for a schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_map, best_epoch, history, bad_total = 0, -math.inf, -1, [], 0
    state_path = out_dir / "last.pt"
    settings = {"model": model_cfg.to_dict(), "train": {k: v for k, v in cfg.to_dict().items() if k != "workers"},
                "data": {"train": labelset_fingerprint(train_set), "val": labelset_fingerprint(val_set)}}
    if resume and state_path.exists():
        state = load_state(state_path)
        changed = settings_differences(json.loads(state.get("settings", "{}")), settings)
        if changed:
            raise TrainingError(f"{state_path}: --resume needs the run's own settings, but {'; '.join(changed)}; "
                                "resume with the same settings or choose another --out")
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
            ema.updates = int(state["ema_updates"])
        start_epoch, best_map, best_epoch = int(state["epoch"]) + 1, float(state["best_map"]), int(state["best_epoch"])
        history = json.loads(state["history"])
        torch.set_rng_state(state["torch_rng"])
        say(f"resumed from {state_path} after epoch {start_epoch}")
    elif resume:
        say(f"no {state_path} yet: starting from scratch")

    mean, std = model_cfg.mean, model_cfg.std
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        loss_fn.train()
        total, seen, skipped_steps, bad_run = 0.0, 0, 0, 0
        train_check = BadImageCheck("train", len(train_set), max_bad_images, strict_images)
        bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress and main)
        for step, (images, targets, indices, errors) in enumerate(train_loader, 1):
            train_check.add(errors)
            if len(indices) == 0:
                bar.advance()
                continue
            x = normalize(images.to(device, non_blocking=True), mean, std).contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(x)
            loss = loss_fn(logits.float(), targets, indices.to(device))
            if not torch.isfinite(loss):
                skipped_steps += 1
                bad_run += 1
                optimizer.zero_grad(set_to_none=True)
                if bad_run >= 10:
                    raise TrainingError(f"the loss was not finite for 10 steps in a row (epoch {epoch + 1}, steps "
                                        f"{step - 9}-{step} of {steps_per_epoch}); train again with a lower --lr "
                                        "or with --amp off")
                bar.advance()
                continue
            bad_run = 0
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            total += loss.item() * len(indices)
            seen += len(indices)
            bar.advance(f"loss {total / max(seen, 1):.4f}")
        bar.close()
        if seen == 0 and skipped_steps:
            raise TrainingError(f"the loss was not finite at any step of epoch {epoch + 1}; train again with a "
                                "lower --lr or with --amp off")
        train_check.finish(seen)
        train_time = time.perf_counter() - t0

        eval_model = ema.module if ema is not None else model
        val_check = BadImageCheck("val", len(val_set), max_bad_images, strict_images)
        scores, idx, _ = predict_loader(eval_model, val_loader, mean, std, device, amp_dtype, check=val_check)
        if world > 1:  # every rank scored the whole val set; keep rank 0's figures
            dist.barrier()
        try:
            val = evaluate_scores(scores, np.asarray(val_set.targets)[idx])
        except ValueError as e:
            raise TrainingError(f"after epoch {epoch + 1}: {e}") from None
        record = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "val_mAP": val["mAP"],
                  "val_CF1": val.get("CF1"), "val_OF1": val.get("OF1"), "lr": scheduler.get_last_lr()[0],
                  "train_s": round(train_time, 2), "epoch_s": round(time.perf_counter() - t0, 2),
                  "bad_images": train_check.count, "val_bad_images": val_check.count, "skipped_steps": skipped_steps}
        history.append(record)
        bad_total += train_check.count
        improved = val["mAP"] > best_map
        if improved:
            best_map, best_epoch = val["mAP"], epoch + 1
        if main:
            if improved:
                save_model(out_dir, eval_model, model_cfg, train_set.classes,
                           thresholds=best_thresholds(scores, np.asarray(val_set.targets)[idx]),
                           extra={"train": cfg.to_dict(), "epoch": epoch + 1, "val_metrics": scalars(val)})
            atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
            save_state(state_path, {
                "model": model.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "ema_updates": ema.updates if ema is not None else 0, "epoch": epoch, "best_map": best_map,
                "best_epoch": best_epoch, "history": json.dumps(history), "torch_rng": torch.get_rng_state(),
                "settings": json.dumps(settings),
            })
            for check in (train_check, val_check):
                if check.count:
                    say(f"epoch {epoch + 1}: {check.split}: skipped {check.count} unreadable images, "
                        f"e.g. {check.messages[0]}")
            say(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {record['train_loss']:.4f}  val mAP {val['mAP']:6.2f}"
                f"{'  *' if improved else ''}  ({record['epoch_s']:.1f}s)")
        dist.barrier()

    test_metrics = None
    if test_set is not None and main and best_epoch > 0:
        from mlic.engine.checkpoint import load_model
        from mlic.engine.evaluate import score_labelset

        best, _ = load_model(out_dir, device)
        test_check = BadImageCheck("test", len(test_set), max_bad_images, strict_images)
        scores, idx, _ = score_labelset(best, test_set, model_cfg.img_size, mean, std, device, cfg.batch_size * 2,
                                        cfg.workers, amp_dtype, test_check)
        test_metrics = evaluate_scores(scores, test_set.targets, rows=idx)
        test_metrics["unreadable_images"] = test_check.count
        if test_check.count:
            say(f"test: skipped {test_check.count} unreadable images, e.g. {test_check.messages[0]}")
        np.save(out_dir / "test_scores.npy", scores)
    dist.barrier()
    return RunResult(out_dir, best_epoch, best_map, test_metrics, history, bad_total)


def scalars(metrics: dict) -> dict:
    """The float entries of a metrics table (JSON-friendly)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}


class progress_bar:  # noqa: N801 - used like a function
    """A rich progress bar that is a no-op when disabled (quiet runs, other ranks, tests)."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(description, total=total, info="")

    def advance(self, info: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, **({"info": info} if info else {}))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
