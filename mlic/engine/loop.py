"""ONE training loop for both modes, read top to bottom (DETR's ``engine.py``).

:func:`drive` owns the epochs: the loss protocol's hooks, validation (:func:`evaluate_scores`, the one rule for
unknown labels), best-epoch keeping, the history (one schema: 1-based ``epoch``, ``train_loss``,
``val_mAP``, ...), thresholds (:func:`fit_thresholds`, sparse-aware), loss state, checkpoints and progress.
Two kinds of steps feed it, each with a ``train_one_epoch``:

- :class:`ImageSteps` (``--mode finetune``): image batches through backbone and head, with AMP, DDP, EMA,
  gradient clipping, a schedule and exact resume from inside an epoch;
- :class:`mlic.engine.linear_probe.FeatureSteps` (``--mode linear``): a linear head on cached features in
  memory, one ``index_select`` and one matmul per step.

A method's hooks are written once and run in both: ``start_epoch`` before each epoch, ``wants_predictions``
/ ``end_epoch`` after it (with the training set's scores), ``apply_corrections`` after each step.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mlic.data.gpu_decode import check_decode_device, collate_encoded, decode_batch, read_encoded
from mlic.data.images import BadImageCheck, EpochOrder, ImageDataset, build_transform, make_loader, normalize
from mlic.data.shards import ShardDataset
from mlic.data.targets import is_sparse
from mlic.engine import dist
from mlic.engine.checkpoint import load_model, save_model
from mlic.engine.evaluate import (
    autocast_dtype,
    evaluate_scores,
    fit_thresholds,
    score_sharded,
    scoring_data,
)
from mlic.engine.job import RunResult, TrainJob
from mlic.engine.report import finite_or_none, metrics_jsonl
from mlic.engine.resume import (
    labelset_fingerprint,
    load_state,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
    settings_differences,
)
from mlic.engine.teaching import setup_teaching
from mlic.errors import MlicError
from mlic.io import atomic_write_bytes
from mlic.losses import build_loss_for_data
from mlic.models.classifier import build_model
from mlic.optim import EMA, build_optimizer, build_schedule, param_groups
from mlic.progress import progress_bar


class TrainingError(MlicError):
    """Training cannot go on; the message says why and what to change."""


@dataclass
class EpochProgress:
    """What one epoch's steps add up (saved inside ``last.pt``, so a run resumed mid-epoch counts on)."""

    total: float = 0.0
    """Sum of batch loss × batch size."""
    seen: int = 0
    """Images in the steps taken."""
    skipped_steps: int = 0
    """Steps dropped because the loss was not finite."""
    bad: list[str] = field(default_factory=list)
    """Messages of the unreadable images met."""

    @property
    def mean_loss(self) -> float:
        return self.total / max(self.seen, 1)


def hook(loss: nn.Module, name: str):
    """One of the loss protocol's optional hooks (see :mod:`mlic.losses`), or None: the loop asks which hooks a
    loss has, never what the loss is."""
    return getattr(loss, name, None)


@dataclass
class LoopSettings:
    """How :func:`drive` runs, whoever asks: the fields of :class:`TrainJob` it reads."""

    out: Path | None = None
    """The run folder; None writes nothing (the in-memory linear probe of benchmarks and grids)."""
    resume: bool = False
    checkpoint_every: float | None = None
    max_bad_images: float = 0.01
    strict_images: bool = False
    progress: bool = False
    log: object = None


def drive(steps, val_targets, test_targets, job: TrainJob | LoopSettings, main: bool = True) -> RunResult:
    """The epochs of one run: hooks, steps, validation, best epoch, history, checkpoints; then test.

    Args:
        steps: :class:`ImageSteps` or :class:`~mlic.engine.linear_probe.FeatureSteps`.
        val_targets: (M, K) clean validation labels (dense or sparse).
        test_targets: (T, K) clean test labels, or None.
        job: where and how (a :class:`TrainJob`, or :class:`LoopSettings`).
        main: whether this process writes and speaks (global rank 0).

    Everything that moves (weights, optimiser, schedule, EMA, loss state, labels, every random stream, the
    position in the epoch) is saved in ``last.pt`` by steps that support it, so ``job.resume`` continues
    the very same run, from an epoch end or from inside an epoch (``job.checkpoint_every``).
    """
    t_start = time.perf_counter()
    say = (job.log or (lambda *a, **k: None)) if main else (lambda *a, **k: None)
    cfg = steps.cfg
    out_dir = Path(job.out) if job.out is not None else None
    writes = main and out_dir is not None
    best = Best()
    history: list[dict] = []
    start_epoch, start_step, partial = 0, 0, EpochProgress()
    state_path = out_dir / "last.pt" if out_dir is not None else None
    if job.resume and state_path.exists():
        state = load_state(state_path)
        changed = settings_differences(json.loads(state.get("settings", "{}")), steps.settings())
        if changed:
            raise TrainingError(f"{state_path}: --resume needs the run's own settings, but {'; '.join(changed)}; "
                                "resume with the same settings or choose another --out")
        steps.load_state_dict(state)
        start_epoch, start_step = int(state["next_epoch"]), int(state["next_step"])
        best = Best(float(state["best_map"]), int(state["best_epoch"]))
        history, partial = json.loads(state["history"]), EpochProgress(**json.loads(state["partial"]))
        set_rng_state(state["rng"])
        where = f"inside epoch {start_epoch + 1} (batch {start_step})" if start_step else f"after epoch {start_epoch}"
        say(f"resumed from {state_path} {where}")
    elif job.resume:
        say(f"no {state_path} yet: starting from scratch")

    def save_resume_state(next_epoch: int, next_step: int) -> None:
        save_state(state_path, {**steps.state_dict(), "next_epoch": next_epoch, "next_step": next_step,
                                "best_map": best.val_map, "best_epoch": best.epoch, "history": json.dumps(history),
                                "partial": json.dumps(partial.__dict__), "rng": rng_state(),
                                "settings": json.dumps(steps.settings())})

    last_save = [time.monotonic()]
    from mlic.engine.tensorboard import open_log

    curves = open_log(getattr(job, "log_to", None), out_dir, writes)  # TensorBoard when the job asks

    def checkpoint(epoch: int, step: int, steps_per_epoch: int) -> None:
        """Called after each step: a resume point inside the epoch every ``job.checkpoint_every`` minutes."""
        if job.checkpoint_every is not None and time.monotonic() - last_save[0] >= job.checkpoint_every * 60:
            if writes and step < steps_per_epoch and steps.resumable_mid_epoch:
                save_resume_state(epoch, step)
            last_save[0] = time.monotonic()

    loss_fn = steps.loss
    num_val = val_targets.shape[0]
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if (start_hook := hook(loss_fn, "start_epoch")) is not None:
            start_hook(epoch)
        skip = start_step if epoch == start_epoch else 0
        if not skip:
            partial = EpochProgress()
        train_check = steps.train_check(job.max_bad_images, job.strict_images)
        train_check.add(partial.bad)
        bar = progress_bar(steps.steps_in(epoch), f"epoch {epoch + 1}/{cfg.epochs}", enabled=job.progress and main)
        bar.advance(count=skip)
        steps.train_one_epoch(epoch, skip, partial, train_check, bar, checkpoint)
        bar.close()
        if partial.seen == 0 and partial.skipped_steps:
            raise TrainingError(f"the loss was not finite at any step of epoch {epoch + 1}; train again with a "
                                "lower --lr or with --amp off")
        train_check.finish(partial.seen)
        if (wants := hook(loss_fn, "wants_predictions")) is not None and wants(epoch):
            loss_fn.end_epoch(epoch, steps.train_scores(epoch, job.progress and main))
        train_time = time.perf_counter() - t0

        val_check = steps.eval_check("val", num_val, job.max_bad_images, job.strict_images)
        scores, rows = steps.scores("val", val_check)
        try:
            val = evaluate_scores(scores, val_targets, rows=rows)
        except ValueError as e:
            raise TrainingError(f"after epoch {epoch + 1}: {e}") from None
        record = {"epoch": epoch + 1, "train_loss": partial.mean_loss, "val_mAP": val["mAP"],
                  "val_CF1": val.get("CF1"), "val_OF1": val.get("OF1"), "lr": steps.lr(),
                  "train_s": round(train_time, 2), "epoch_s": round(time.perf_counter() - t0, 2),
                  "bad_images": train_check.count, "val_bad_images": val_check.count,
                  "skipped_steps": partial.skipped_steps}
        history.append(record)
        curves.epoch(record)
        improved = best.epoch < 0 or val["mAP"] > best.val_map  # a NaN mAP (no class with a positive) keeps epoch 1
        if improved:
            best = Best(val["mAP"], epoch + 1, steps.snapshot(), fit_thresholds(scores, val_targets, rows),
                        scalars(val))
        if writes and steps.saves_every_epoch:
            if improved:
                publish(steps, best, out_dir)
            atomic_write_bytes(out_dir / "metrics.jsonl", metrics_jsonl(history).encode())
            save_resume_state(epoch + 1, 0)
            last_save[0] = time.monotonic()
        for check in (train_check, val_check):
            if check.count:
                say(f"epoch {epoch + 1}: {check.split}: skipped {check.count} unreadable images, "
                    f"e.g. {check.messages[0]}")
        say(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {record['train_loss']:.4f}  val mAP {val['mAP']:6.2f}"
            f"{'  *' if improved else ''}  ({record['epoch_s']:.1f}s)")
        dist.barrier()

    if writes and not steps.saves_every_epoch:
        publish(steps, best, out_dir)
        atomic_write_bytes(out_dir / "metrics.jsonl", metrics_jsonl(history).encode())
    test_metrics, test_scores = None, None
    if test_targets is not None:
        dist.barrier()  # rank 0 wrote the best model
        test_check = steps.eval_check("test", test_targets.shape[0], job.max_bad_images, job.strict_images)
        test_scores, rows = steps.test_scores(best, out_dir, test_check)
        test_metrics = evaluate_scores(test_scores, test_targets, rows=rows)
        test_metrics["unreadable_images"] = test_check.count
        if test_check.count:
            say(f"test: skipped {test_check.count} unreadable images, e.g. {test_check.messages[0]}")
    dist.barrier()
    curves.test(test_metrics if main else None, best.epoch)
    curves.close()
    return RunResult(out_dir, best.epoch, best.val_map, test_metrics if main else None, history,
                     history[-1]["bad_images"] if history else 0, test_scores if main else None,
                     time.perf_counter() - t_start, best)


@dataclass
class Best:
    """The best epoch so far: its validation mAP, what the steps need to rebuild its model, its thresholds."""

    val_map: float = -math.inf
    epoch: int = -1
    """1-based; -1 before the first epoch."""
    snapshot: object = None
    """What :meth:`snapshot` of the steps returned (None where the model is written at once)."""
    thresholds: np.ndarray | None = None
    val_metrics: dict = field(default_factory=dict)


def publish(steps, best: Best, out_dir: Path) -> None:
    """Write the best model (weights + model.json with thresholds) and the loss's state beside it."""
    from safetensors.torch import save

    model, loss_state = steps.best_model(best)
    save_model(out_dir, model, model.config, steps.classes, thresholds=best.thresholds,
               extra={"train": steps.cfg.to_dict(), "mode": steps.mode, "epoch": best.epoch,
                      "val_metrics": best.val_metrics, **steps.extra})
    state = {k: v.detach().cpu().contiguous() for k, v in loss_state.items()}
    if state:  # for --init-from (e.g. ROLE's estimated labels); nothing when the loss keeps no state
        atomic_write_bytes(out_dir / "loss.safetensors", save(state))
    steps.published(best, out_dir)


def scalars(metrics: dict) -> dict:
    """The float entries of a metrics table (JSON-friendly)."""
    return finite_or_none({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))})


# ---------------------------------------------------------------------------------------------------------------
# image batches: --mode finetune


def pretrained_weights(job: TrainJob):
    """``job.pretrained`` resolved to one local file (a file, ``timm``, ``hf-hub:``), hashed once; or None."""
    from mlic.models.backbones import resolve_pretrained

    return resolve_pretrained(job.pretrained, job.model.backbone) if job.pretrained else None


def weights_record(job: TrainJob, weights) -> dict:
    """What model.json records of the backbone's starting weights: what was asked, where they came from."""
    return {"spec": str(job.pretrained), "source": weights.source, "sha256": weights.sha256}


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


class ImageSteps:
    """Fine-tuning steps: forward → loss → non-finite guard → backward → unscale → clip → step → schedule →
    corrections → EMA, on image batches, for torchrun + DDP (an epoch order that is a function of (seed,
    epoch); a handle on the unwrapped model)."""

    mode = "finetune"
    saves_every_epoch = True
    """The best model and ``last.pt`` are written after every epoch: a killed run loses at most an epoch."""

    def __init__(self, job: TrainJob, rank: int, world: int, device: torch.device, say) -> None:
        from mlic.engine.threads import choose_threads

        model_cfg, cfg, splits = job.model, job.train, job.splits
        train_set = splits.train
        if model_cfg.num_classes != train_set.num_classes:
            raise TrainingError(f"the model has {model_cfg.num_classes} outputs but the data has "
                                f"{train_set.num_classes} classes")
        if cfg.workers is None:
            cfg = replace(cfg, workers=choose_threads(None, cfg.threads)[1])
        self.cfg, self.job, self.splits, self.world, self.device = cfg, job, splits, world, device
        self.classes = train_set.classes
        seed_everything(cfg.seed + rank)
        weights = pretrained_weights(job)
        self.extra = {"pretrained": weights_record(job, weights)} if weights else {}
        model = build_model(model_cfg, pretrained=weights)
        if cfg.freeze:
            say(f"froze {freeze(model, cfg.freeze)} backbone tensors ({', '.join(cfg.freeze)})")
        loss_fn = build_loss_for_data(cfg.loss, cfg.loss_args, train_set.train_targets, cfg.epochs, cfg.seed,
                                      clean=train_set.targets)
        self.teaching = setup_teaching(job, train_set, loss_fn, device, say, rank, world)  # not None: every step
        if job.init_from is not None:
            init_from_run(Path(job.init_from), model, loss_fn, say)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model = model.to(device, memory_format=self.memory_format)
        self.loss = loss_fn = loss_fn.to(device)
        self.labels = training_labels(train_set.train_targets, loss_fn)  # corrections may change it
        self.ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
        self.net = DistributedDataParallel(model) if world > 1 else model

        self.train_transform = build_transform(model_cfg.img_size, True, cfg.augment, cfg.hflip)
        self.eval_transform = build_transform(model_cfg.img_size, False)
        self.stream = stream = splits.shards.get("train")
        if stream is None:
            self.train_data = ImageDataset(train_set, self.train_transform)
            self.order = EpochOrder(len(train_set), cfg.seed, rank, world)
            self.loader = make_loader(self.train_data, cfg.batch_size, workers=cfg.workers, sampler=self.order,
                                      drop_last=len(self.order) > cfg.batch_size, seed=cfg.seed)
            self.epoch_steps = [max(1, len(self.loader))] * cfg.epochs
        else:
            self.train_data = ShardDataset(stream, self.train_transform, seed=cfg.seed, rank=rank, world_size=world)
            self.loader = make_loader(self.train_data, cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
                                      drop_last=len(self.train_data) > cfg.batch_size)
            self.epoch_steps = shard_steps(self.train_data, cfg.batch_size, cfg.workers, cfg.epochs,
                                           self.loader.drop_last)
            if job.checkpoint_every is not None:
                say("shards: checkpoints at epoch ends only (a shard stream resumes at an epoch boundary)")
        self.resumable_mid_epoch = stream is None
        self.sampling = self.order if stream is None else self.train_data  # whose sample_seed(row) seeds a sample
        if cfg.decode_device != "cpu":  # --decode-device: the workers hand JPEGs on undecoded; batches decode here
            check_decode_device(cfg.decode_device, device)
            self.train_data.read, self.loader.collate_fn = read_encoded, collate_encoded
        self.val_data = scoring_data("val", splits, self.eval_transform)

        self.optimizer = build_optimizer(param_groups(model, loss_fn, cfg), cfg)
        self.scheduler = build_schedule(self.optimizer, cfg, sum(self.epoch_steps))
        self.amp_dtype = autocast_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    def settings(self) -> dict:
        """What a resumed run must share with the saved one (how fast it runs may change)."""
        unrelated = ("workers", "threads")
        teacher = {"teacher": self.job.teacher, "teacher_args": self.job.teacher_args or None,
                   "teacher_cache": self.job.teacher_cache if self.job.teacher else None}  # None: as runs before them
        return {"model": self.job.model.to_dict(),
                "train": {**{k: v for k, v in self.cfg.to_dict().items() if k not in unrelated}, **teacher},
                "data": {"train": labelset_fingerprint(self.splits.train),
                         "val": labelset_fingerprint(self.splits.val)}}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "labels": self.labels if isinstance(self.labels, torch.Tensor) else None,  # sparse: never change
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "ema_updates": self.ema.updates if self.ema is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if isinstance(self.labels, torch.Tensor):
            self.labels.copy_(state["labels"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.updates = int(state["ema_updates"])
        if int(state["next_step"]) and self.stream is not None:
            raise TrainingError(f"saved inside epoch {int(state['next_epoch']) + 1}, but a shard stream resumes at "
                                "an epoch boundary; resume from the folder the shards were packed from, or train "
                                "again with --overwrite")

    def steps_in(self, epoch: int) -> int:
        return self.epoch_steps[epoch]

    def eval_check(self, split: str, total: int, limit: float, strict: bool) -> BadImageCheck:
        return BadImageCheck(split, total, limit, strict)

    def train_check(self, limit: float, strict: bool) -> BadImageCheck:
        check = BadImageCheck("train", len(self.splits.train), limit, strict)
        if self.stream is not None:  # images 'mlic prepare shards' could not read count as this split's unreadable
            check.add([f"{entry['path']}: {entry['reason']}" for entry in self.stream.skipped])
        return check

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_one_epoch(self, epoch: int, skip: int, partial: EpochProgress, check: BadImageCheck, bar,
                        checkpoint) -> None:
        """The steps of one epoch after the first ``skip`` (a resumed epoch), adding up into ``partial``."""
        cfg, model, loss_fn, optimizer, device = self.cfg, self.model, self.loss, self.optimizer, self.device
        mean, std = self.job.model.mean, self.job.model.std
        steps_per_epoch = self.epoch_steps[epoch]
        if self.stream is None:
            self.order.set_epoch(epoch, skip * cfg.batch_size)
        else:
            self.train_data.set_epoch(epoch)
        self.net.train()
        loss_fn.train()
        corrections = hook(loss_fn, "apply_corrections")
        bad_run = 0
        batches = itertools.islice(self.loader, steps_per_epoch - skip)  # shards: every rank takes as many steps
        for step, (images, _, indices, errors) in enumerate(batches, skip + 1):
            if cfg.decode_device != "cpu":  # JPEG bytes -> the augmented uint8 batch, on the device
                seeds = [self.sampling.sample_seed(row) for row in indices.tolist()]
                images, indices, more = decode_batch(images, indices, self.train_data.transform, device, seeds)
                errors = errors + more
            check.add(errors)
            partial.bad += errors
            if len(indices) == 0:
                bar.advance()
                continue
            x = normalize(images.to(device, non_blocking=True), mean, std).contiguous(memory_format=self.memory_format)
            targets = batch_rows(self.labels, indices).to(device, non_blocking=True)
            if self.teaching is not None:  # the teacher's pseudo-labels of this step's own views
                self.teaching.step(x, images, targets, indices, loss_fn)
            with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                logits = self.net(x)
            loss = loss_fn(logits.float(), targets, indices.to(device))
            if not torch.isfinite(loss):
                partial.skipped_steps += 1
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
            self.scaler.scale(loss).backward()
            if self.world > 1:  # the loss's own parameters (ROLE's estimator) are not in DDP: average their
                for p in loss_fn.parameters():  # gradients too, so that every rank keeps the same per-image state
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(self.world)
            if cfg.clip_grad > 0:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            self.scaler.step(optimizer)
            self.scaler.update()
            self.scheduler.step()
            if corrections is not None:
                apply_everywhere(corrections, self.labels)
            if self.ema is not None:
                self.ema.update(model)
            partial.total += loss.item() * len(indices)
            partial.seen += len(indices)
            bar.advance(f"loss {partial.mean_loss:.4f}")
            checkpoint(epoch, step, steps_per_epoch)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def train_scores(self, epoch: int, progress: bool) -> torch.Tensor:
        """Probabilities (N, K) of the training set (eval mode, training transform, as the methods' code)."""
        cfg = self.cfg
        scores, _ = score_sharded(self.model, scoring_data("train", self.splits, self.train_transform),
                                  cfg.batch_size * 2, cfg.workers, self.job.model.mean, self.job.model.std,
                                  self.device, self.amp_dtype, seed=cfg.seed * 7919 + epoch,
                                  description="scores of the training set" if progress else None)
        return torch.from_numpy(scores).to(self.device)

    def scores(self, split: str, check: BadImageCheck, model: nn.Module | None = None):
        """(scores (N, K), readable rows) of the validation set (or ``split``'s) under the model kept so far."""
        cfg = self.cfg
        data = self.val_data if split == "val" else scoring_data(split, self.splits, self.eval_transform)
        return score_sharded(model or self.eval_model, data, cfg.batch_size * 2, cfg.workers, self.job.model.mean,
                             self.job.model.std, self.device, self.amp_dtype, check=check)

    def snapshot(self) -> None:
        return None  # the best model is written at once (saves_every_epoch)

    def best_model(self, best: Best) -> tuple[nn.Module, dict]:
        return self.eval_model, self.loss.state_dict()

    def published(self, best: Best, out_dir: Path) -> None:
        pass

    def test_scores(self, best: Best, out_dir: Path, check: BadImageCheck):
        kept, _ = load_model(out_dir, self.device)  # the best epoch's model, as written
        return self.scores("test", check, kept)


def training_labels(targets, loss_fn: nn.Module):
    """The (N, K) labels training reads by row: an int8 tensor (a loss's corrections write into it), or the
    sparse targets themselves when the data stores them sparsely (each batch materialises its own rows)."""
    if not is_sparse(targets):
        return torch.from_numpy(np.array(targets, dtype=np.int8))
    if hook(loss_fn, "apply_corrections") is not None:
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
