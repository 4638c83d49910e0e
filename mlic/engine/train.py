"""Fine-tuning: the training loop of ``--mode finetune``, one function you can read top to bottom.

forward → loss → non-finite guard → backward → unscale → clip → step → schedule → corrections → EMA,
then per epoch: the loss's end-of-epoch pass if it wants one, validation (scored in shards across
ranks), a JSONL line, resume state, the best model. Written for torchrun + DDP: a handle on the
unwrapped model, an epoch order that is a function of (seed, epoch), saving on rank 0 only.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mlic.config import TrainConfig
from mlic.data.gpu_decode import check_decode_device, collate_encoded, decode_batch, read_encoded
from mlic.data.images import BadImageCheck, EpochOrder, ImageDataset, build_transform, make_loader, normalize
from mlic.data.shards import ShardDataset
from mlic.engine import dist
from mlic.engine.checkpoint import labelset_fingerprint, load_state, save_model, save_state, settings_differences
from mlic.engine.evaluate import (
    autocast_dtype,
    evaluate_scores,
    fit_thresholds,
    progress_bar,
    score_sharded,
    scoring_data,
)
from mlic.engine.job import RunResult, TrainJob
from mlic.engine.run import choose_threads
from mlic.errors import MlicError
from mlic.io import atomic_write_bytes
from mlic.losses import build_loss_for_data
from mlic.models.classifier import build_model


class TrainingError(MlicError):
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


def _hook(loss: nn.Module, name: str):
    """One of the loss protocol's optional hooks (see :mod:`mlic.losses`), or None: the engine asks which
    hooks a loss has, never what the loss is."""
    return getattr(loss, name, None)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))


def init_from_run(run_dir: Path, model: nn.Module, loss: nn.Module, say) -> None:
    """Start from a finished run: its model weights (strictly checked) and, where it saved one, its loss state."""
    from safetensors.torch import load_file

    from mlic.engine.checkpoint import CheckpointError, read_model_meta
    from mlic.models.weights import check_state_dict

    meta = read_model_meta(run_dir)
    if meta["model"] != model.config.to_dict():
        raise CheckpointError(f"{run_dir}: --init-from needs a run of the same model; it has {meta['model']}")
    model.load_state_dict(check_state_dict(load_file(str(run_dir / "model.safetensors")), model,
                                           run_dir / "model.safetensors"))
    loss_file = run_dir / "loss.safetensors"
    if loss_file.exists():
        loss.load_state_dict(check_state_dict(load_file(str(loss_file)), loss, loss_file))
    say(f"init: model weights{' and loss state' if loss_file.exists() else ''} of {run_dir}")


def fit(job: TrainJob) -> RunResult:
    """Fine-tune a classifier end to end, keeping the best epoch by validation mAP (clean labels).

    The loss protocol's hooks run here: ``start_epoch`` before each epoch; after it, when
    ``wants_predictions`` says so, a no-grad pass over the training set (eval mode, training transform, as
    the methods' own code) feeds ``end_epoch``; after each optimiser step ``apply_corrections`` writes
    permanent label changes into the training labels the next batches read. Everything that moves
    (weights, optimiser, schedule, EMA, loss state, labels, every random stream, the position in the
    epoch) is saved in ``last.pt``, so ``resume`` continues the very same run, from an epoch end or from
    inside an epoch (``job.checkpoint_every``).
    """
    model_cfg, cfg, splits, out_dir = job.model, job.train, job.splits, Path(job.out)
    train_set, val_set, test_set = splits.train, splits.val, splits.test
    rank, world, device = dist.init_distributed()
    main = rank == 0
    say = job.log if main else (lambda *a, **k: None)
    if model_cfg.num_classes != train_set.num_classes:
        raise TrainingError(f"the model has {model_cfg.num_classes} outputs but the data has "
                            f"{train_set.num_classes} classes")
    t_start = time.perf_counter()
    if cfg.workers is None:
        cfg = replace(cfg, workers=choose_threads(None, cfg.threads)[1])
    seed_everything(cfg.seed + rank)
    model = build_model(model_cfg, pretrained=job.pretrained)
    if cfg.freeze:
        say(f"froze {freeze(model, cfg.freeze)} backbone tensors ({', '.join(cfg.freeze)})")
    loss_fn = build_loss_for_data(cfg.loss, cfg.loss_args, train_set.train_targets, cfg.epochs, cfg.seed,
                                  clean=train_set.targets)
    if job.init_from is not None:
        init_from_run(Path(job.init_from), model, loss_fn, say)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    loss_fn = loss_fn.to(device)
    labels = training_labels(train_set.train_targets, loss_fn)  # what training reads; corrections may change it
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    net = DistributedDataParallel(model) if world > 1 else model

    train_transform = build_transform(model_cfg.img_size, True, cfg.augment, cfg.hflip)
    eval_transform = build_transform(model_cfg.img_size, False)
    stream = splits.shards.get("train")
    if stream is None:
        train_data = ImageDataset(train_set, train_transform)
        order = EpochOrder(len(train_set), cfg.seed, rank, world)
        train_loader = make_loader(train_data, cfg.batch_size, workers=cfg.workers, sampler=order,
                                   drop_last=len(order) > cfg.batch_size, seed=cfg.seed)
        epoch_steps = [max(1, len(train_loader))] * cfg.epochs
    else:
        train_data = ShardDataset(stream, train_transform, seed=cfg.seed, rank=rank, world_size=world)
        train_loader = make_loader(train_data, cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
                                   drop_last=len(train_data) > cfg.batch_size)
        epoch_steps = shard_steps(train_data, cfg.batch_size, cfg.workers, cfg.epochs, train_loader.drop_last)
        if job.checkpoint_every is not None:
            say("shards: checkpoints at epoch ends only (a shard stream resumes at an epoch boundary)")
    sampling = order if stream is None else train_data  # whose sample_seed(row) seeds each sample's augmentation
    if cfg.decode_device != "cpu":  # --decode-device: the workers hand JPEGs on undecoded; batches decode below
        check_decode_device(cfg.decode_device, device)
        train_data.read, train_loader.collate_fn = read_encoded, collate_encoded
    val_data = scoring_data("val", splits, eval_transform)

    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, cfg), lr=cfg.lr)
    scheduler = build_schedule(optimizer, cfg, sum(epoch_steps))
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, start_step, best_map, best_epoch, history = 0, 0, -math.inf, -1, []
    partial = {"total": 0.0, "seen": 0, "skipped_steps": 0, "bad": []}
    state_path = out_dir / "last.pt"
    unrelated = ("workers", "threads")  # how fast, not what is learned: may change on resume
    settings = {"model": model_cfg.to_dict(), "train": {k: v for k, v in cfg.to_dict().items() if k not in unrelated},
                "data": {"train": labelset_fingerprint(train_set), "val": labelset_fingerprint(val_set)}}
    if job.resume and state_path.exists():
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
        if isinstance(labels, torch.Tensor):
            labels.copy_(state["labels"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
            ema.updates = int(state["ema_updates"])
        start_epoch, start_step = int(state["next_epoch"]), int(state["next_step"])
        if start_step and stream is not None:
            raise TrainingError(f"{state_path}: saved inside epoch {start_epoch + 1}, but a shard stream resumes "
                                "at an epoch boundary; resume from the folder the shards were packed from, or "
                                "train again with --overwrite")
        best_map, best_epoch = float(state["best_map"]), int(state["best_epoch"])
        history, partial = json.loads(state["history"]), json.loads(state["partial"])
        _set_rng_state(state["rng"])
        where = f"inside epoch {start_epoch + 1} (batch {start_step})" if start_step else f"after epoch {start_epoch}"
        say(f"resumed from {state_path} {where}")
    elif job.resume:
        say(f"no {state_path} yet: starting from scratch")

    def save_resume_state(next_epoch: int, next_step: int) -> None:
        save_state(state_path, {
            "model": model.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "labels": labels if isinstance(labels, torch.Tensor) else None,  # sparse labels never change
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_updates": ema.updates if ema is not None else 0, "next_epoch": next_epoch, "next_step": next_step,
            "best_map": best_map, "best_epoch": best_epoch, "history": json.dumps(history),
            "partial": json.dumps(partial), "rng": _rng_state(), "settings": json.dumps(settings),
        })

    mean, std = model_cfg.mean, model_cfg.std
    last_save = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if (start_hook := _hook(loss_fn, "start_epoch")) is not None:
            start_hook(epoch)
        skip = start_step if epoch == start_epoch else 0
        steps_per_epoch = epoch_steps[epoch]
        if stream is None:
            order.set_epoch(epoch, skip * cfg.batch_size)
        else:
            train_data.set_epoch(epoch)
        net.train()
        loss_fn.train()
        if not skip:
            partial = {"total": 0.0, "seen": 0, "skipped_steps": 0, "bad": []}
        train_check = BadImageCheck("train", len(train_set), job.max_bad_images, job.strict_images)
        train_check.add(partial["bad"])
        if stream is not None:  # images 'mlic prepare shards' could not read count as this split's unreadable ones
            train_check.add([f"{entry['path']}: {entry['reason']}" for entry in stream.skipped])
        bad_run = 0
        bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", enabled=job.progress and main)
        bar.advance(count=skip)
        corrections = _hook(loss_fn, "apply_corrections")
        batches = itertools.islice(train_loader, steps_per_epoch - skip)  # shards: every rank takes as many steps
        for step, (images, _, indices, errors) in enumerate(batches, skip + 1):
            if cfg.decode_device != "cpu":  # JPEG bytes -> the augmented uint8 batch, on the device
                seeds = [sampling.sample_seed(row) for row in indices.tolist()]
                images, indices, more = decode_batch(images, indices, train_data.transform, device, seeds)
                errors = errors + more
            train_check.add(errors)
            partial["bad"] += errors
            if len(indices) == 0:
                bar.advance()
                continue
            x = normalize(images.to(device, non_blocking=True), mean, std).contiguous(memory_format=memory_format)
            targets = batch_rows(labels, indices).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(x)
            loss = loss_fn(logits.float(), targets, indices.to(device))
            if not torch.isfinite(loss):
                partial["skipped_steps"] += 1
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
            if world > 1:  # the loss's own parameters (ROLE's estimator) are not in DDP: average their gradients
                for p in loss_fn.parameters():  # too, so that every rank keeps the same per-image state
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(world)
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if corrections is not None:
                apply_everywhere(corrections, labels)
            if ema is not None:
                ema.update(model)
            partial["total"] += loss.item() * len(indices)
            partial["seen"] += len(indices)
            bar.advance(f"loss {partial['total'] / max(partial['seen'], 1):.4f}")
            if job.checkpoint_every is not None and time.monotonic() - last_save >= job.checkpoint_every * 60:
                if main and step < steps_per_epoch and stream is None:
                    save_resume_state(epoch, step)
                last_save = time.monotonic()
        bar.close()
        if partial["seen"] == 0 and partial["skipped_steps"]:
            raise TrainingError(f"the loss was not finite at any step of epoch {epoch + 1}; train again with a "
                                "lower --lr or with --amp off")
        train_check.finish(partial["seen"])
        if (wants := _hook(loss_fn, "wants_predictions")) is not None and wants(epoch):
            train_scores, _ = score_sharded(model, scoring_data("train", splits, train_transform), cfg.batch_size * 2,
                                         cfg.workers, mean, std, device, amp_dtype, seed=cfg.seed * 7919 + epoch,
                                         description="scores of the training set" if job.progress and main else None)
            loss_fn.end_epoch(epoch, torch.from_numpy(train_scores).to(device))
        train_time = time.perf_counter() - t0

        eval_model = ema.module if ema is not None else model
        val_check = BadImageCheck("val", len(val_set), job.max_bad_images, job.strict_images)
        scores, rows = score_sharded(eval_model, val_data, cfg.batch_size * 2, cfg.workers, mean, std, device,
                                     amp_dtype, check=val_check)
        try:
            val = evaluate_scores(scores, val_set.targets, rows=rows)
        except ValueError as e:
            raise TrainingError(f"after epoch {epoch + 1}: {e}") from None
        record = {"epoch": epoch + 1, "train_loss": partial["total"] / max(partial["seen"], 1), "val_mAP": val["mAP"],
                  "val_CF1": val.get("CF1"), "val_OF1": val.get("OF1"), "lr": scheduler.get_last_lr()[0],
                  "train_s": round(train_time, 2), "epoch_s": round(time.perf_counter() - t0, 2),
                  "bad_images": train_check.count, "val_bad_images": val_check.count,
                  "skipped_steps": partial["skipped_steps"]}
        history.append(record)
        improved = val["mAP"] > best_map
        if improved:
            best_map, best_epoch = val["mAP"], epoch + 1
        if main:
            if improved:
                save_model(out_dir, eval_model, model_cfg, train_set.classes,
                           thresholds=fit_thresholds(scores, val_set.targets, rows),
                           extra={"train": cfg.to_dict(), "epoch": epoch + 1, "val_metrics": scalars(val)})
                save_loss_state(out_dir, loss_fn)
            atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
            save_resume_state(epoch + 1, 0)
            last_save = time.monotonic()
            for check in (train_check, val_check):
                if check.count:
                    say(f"epoch {epoch + 1}: {check.split}: skipped {check.count} unreadable images, "
                        f"e.g. {check.messages[0]}")
            say(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {record['train_loss']:.4f}  val mAP {val['mAP']:6.2f}"
                f"{'  *' if improved else ''}  ({record['epoch_s']:.1f}s)")
        dist.barrier()

    test_metrics, test_scores = None, None
    if test_set is not None:
        from mlic.engine.checkpoint import load_model

        dist.barrier()  # rank 0 wrote the best model
        best, _ = load_model(out_dir, device)
        test_check = BadImageCheck("test", len(test_set), job.max_bad_images, job.strict_images)
        test_data = scoring_data("test", splits, eval_transform)
        test_scores, rows = score_sharded(best, test_data, cfg.batch_size * 2, cfg.workers, mean, std, device,
                                          amp_dtype, check=test_check)
        test_metrics = evaluate_scores(test_scores, test_set.targets, rows=rows)
        test_metrics["unreadable_images"] = test_check.count
        if test_check.count:
            say(f"test: skipped {test_check.count} unreadable images, e.g. {test_check.messages[0]}")
    dist.barrier()
    return RunResult(out_dir, best_epoch, best_map, test_metrics if main else None, history,
                     history[-1]["bad_images"] if history else 0, test_scores if main else None,
                     time.perf_counter() - t_start)


def training_labels(targets, loss_fn: nn.Module):
    """The (N, K) labels training reads by row: an int8 tensor (a loss's corrections write into it), or the
    sparse targets themselves when the data stores them sparsely (each batch materialises its own rows)."""
    if not hasattr(targets, "by_class"):
        return torch.from_numpy(np.array(targets, dtype=np.int8))
    if _hook(loss_fn, "apply_corrections") is not None:
        n, k = targets.shape
        raise TrainingError(f"this loss corrects labels in place, which needs the dense {n:,} x {k:,} label matrix "
                            f"({n * k / 2**30:.1f} GiB) that sparse data avoids; choose a loss without "
                            "corrections (e.g. ll_r or ll_ct instead of ll_cp)")
    return targets


def batch_rows(labels, indices: torch.Tensor) -> torch.Tensor:
    """The int8 (B, K) label rows of a batch from :func:`training_labels`' matrix."""
    if isinstance(labels, torch.Tensor):
        return labels[indices]
    return torch.from_numpy(np.asarray(labels[indices.numpy()], dtype=np.int8))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """OneCycle (cosine, ≥ 1 warm-up step) or a constant learning rate (``cfg.schedule``)."""
    if cfg.schedule == "onecycle" and total_steps >= 4:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
            pct_start=min(0.5, max(cfg.pct_start, 1.5 / total_steps)), anneal_strategy="cos")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant, or too few steps for one


def apply_everywhere(apply_corrections, labels: torch.Tensor) -> None:
    """Run a loss's ``apply_corrections`` so that every rank ends with the same labels: under DDP each rank's
    corrections are written on every rank (a rank only saw its own batch)."""
    if not torch.distributed.is_initialized():
        apply_corrections(labels)
        return
    before = labels.clone()
    apply_corrections(labels)
    changed = (labels != before).nonzero()
    values = labels[changed[:, 0], changed[:, 1]]
    for rows_cols, vals in dist.gather_objects((changed.cpu(), values.cpu())):
        labels[rows_cols[:, 0], rows_cols[:, 1]] = vals


def save_loss_state(out_dir: Path, loss_fn: nn.Module) -> None:
    """The loss's state next to the best model (``loss.safetensors``), for ``--init-from``; nothing when empty."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in loss_fn.state_dict().items()}
    if state:
        atomic_write_bytes(out_dir / "loss.safetensors", save(state))


def shard_steps(data: ShardDataset, batch_size: int, workers: int, epochs: int, drop_last: bool) -> list[int]:
    """Optimisation steps of each epoch from shards: the fewest batches any rank gets that epoch, so that
    every DDP rank stops after the same step (ranks hold whole shards, so their counts differ)."""
    steps = []
    for epoch in range(epochs):
        data.set_epoch(epoch)
        counts = [data.num_batches(batch_size, workers, drop_last, rank=r) for r in range(data.world_size)]
        if min(counts) == 0:
            raise TrainingError(f"{data.index.location}: in epoch {epoch + 1} rank {counts.index(0)} gets no full "
                                f"batch of {batch_size} from its shards; lower --batch-size or --workers, or write "
                                "smaller shards (mlic prepare shards --shard-size)")
        steps.append(min(counts))
    data.set_epoch(0)
    return steps


def scalars(metrics: dict) -> dict:
    """The float entries of a metrics table (JSON-friendly)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}
