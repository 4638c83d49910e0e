"""``--mode linear``: a linear head on cached backbone features, the steps of :func:`mlic.engine.loop.drive`.

Cole et al.'s "linear_fixed_features" protocol, fast: the training features live in memory as one float32
tensor; an epoch is a random permutation of row numbers cut into batches, each batch one ``index_select``,
one matmul, the loss, one Adam step (no DataLoader, no per-example Python). Validation is one matmul over the
validation features each epoch, scored by the loop's one rule (:func:`mlic.engine.evaluate.evaluate_scores`);
the best epoch's head is kept in memory and written once at the end (a probe reruns from its cached features
in seconds, so it keeps no ``last.pt``). The run folder ends up like a fine-tuned one: ``model.safetensors``
+ ``model.json`` (the backbone and the learned head, so ``mlic predict`` / ``eval`` work),
``loss.safetensors``, ``metrics.jsonl``, ``features/{train,val,test}.npy`` and, for a loss that learns
labels (ROLE), ``estimated_labels.npy`` (NaN rows for unreadable images).

ROLE's label estimator (an N×K parameter of the loss) is optimised as the official code does
(``estimator_update="official"``: a dense Adam group whose gradient is zero outside the batch, so every row
moves every step on its momentum) or lazily (``"fast"``, :class:`mlic.optim.RowAdam`): only the batch's rows
are touched, and the motion a row made on its momentum meanwhile is added in closed form when it is next
read. Both give the same trajectory up to Adam's eps in the skipped steps.

Training labels stay as the data stores them: a sparse LabelSet's targets are never densified (each batch
materialises its own rows, as in fine-tuning).

Cole et al.'s protocol: Adam, no weight decay, no schedule, 25 epochs, grid batch {8, 16} × lr {1e-2, 1e-3,
1e-4, 1e-5} (:func:`grid_search`), the epoch and the run picked by validation mAP, test mAP reported at that
epoch; 20 % of the official train set held out for validation (:func:`mlic.data.labelset.cole_split`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlic.config import TrainConfig
from mlic.data.images import BadImageCheck
from mlic.data.targets import is_sparse
from mlic.engine.job import TrainJob
from mlic.engine.loop import EpochProgress, LoopSettings, TrainingError, batch_rows, drive, hook, training_labels
from mlic.engine.teaching import setup_teaching
from mlic.errors import MlicError
from mlic.losses import build_loss_for_data
from mlic.optim import RowAdam, build_schedule

Features = np.ndarray | torch.Tensor  # (N, C) features: NumPy (memory maps welcome) or torch


class LinearProbe:
    """A linear head (K×C), its loss and its optimiser(s); :meth:`step` is one optimisation step.

    A loss with learnable state (ROLE's (N, K) estimator: the loss's parameters) is optimised too, at lr ×
    ``estimator_lr_mult``; when the loss offers the protocol's ``forward_rows`` hook, lazily, row by row.

    Args:
        num_features: C.
        num_classes: K.
        num_images: N, training-set size.
        config: run settings (:meth:`TrainConfig.linear_defaults`).
        observed: (N, K) observed training labels in {1, 0, -1}; the loss is built from them (ROLE's
            estimator starts from them) unless ``loss`` is given.
        dtype: parameter dtype (float32; float64 for conformance checks).
        loss: the loss, already built for the data (:func:`mlic.losses.build_loss_for_data`).
    """

    def __init__(self, num_features: int, num_classes: int, num_images: int, config: TrainConfig,
                 observed: np.ndarray | torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 loss: nn.Module | None = None) -> None:
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        bound = 1.0 / math.sqrt(num_features)  # nn.Linear's default init, drawn from our own generator
        self.head = nn.Linear(num_features, num_classes, dtype=dtype)
        with torch.no_grad():
            self.head.weight.copy_(torch.rand(num_classes, num_features, generator=generator) * 2 * bound - bound)
            self.head.bias.copy_(torch.rand(num_classes, generator=generator) * 2 * bound - bound)
        if loss is None:
            labels = observed if observed is not None else np.full((num_images, num_classes), -1, np.int8)
            loss = build_loss_for_data(config.loss, config.loss_args, labels, config.epochs, config.seed)
        self.loss = loss.to(dtype)
        learned = [p for p in self.loss.parameters() if p.requires_grad]
        if len(learned) > 1:
            raise MlicError(f"loss '{config.loss}' has {len(learned)} learnable tensors; the linear probe "
                            "optimises at most one (a per-image estimator)")
        self.estimator = learned[0] if learned else None
        groups = [{"params": [self.head.weight], "weight_decay": config.weight_decay},
                  {"params": [self.head.bias], "weight_decay": 0.0}]
        self.row_adam: RowAdam | None = None
        if self.estimator is not None:
            estimator_lr = config.lr * config.estimator_lr_mult
            if config.estimator_update == "official" or not hasattr(self.loss, "forward_rows"):
                groups.append({"params": [self.estimator], "lr": estimator_lr, "weight_decay": 0.0})
            else:
                self.estimator.requires_grad_(False)
                self.row_adam = RowAdam(self.estimator, estimator_lr, config.betas, config.adam_eps)
        fused = config.fused and (self.row_adam is not None or self.estimator is None)
        kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = kind(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps, fused=fused or None)

    def step(self, x: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
             matmul_threads: int | None = None) -> torch.Tensor:
        """One step on features x (B, C), targets (B, K) in {1, 0, -1}, dataset rows indices (B,).

        The head's two matmuls (logits, weight gradient) are written out, so that they alone can run
        on ``matmul_threads`` threads while the small elementwise work stays on the caller's setting.

        Returns the batch objective (detached scalar).
        """
        self.optimizer.zero_grad(set_to_none=True)
        weight, bias = self.head.weight, self.head.bias
        with torch.no_grad(), threads(matmul_threads):
            logits = torch.addmm(bias, x, weight.t())
        logits.requires_grad_(True)
        if self.row_adam is not None:
            rows = self.row_adam.catch_up(indices).requires_grad_(True)
            loss = self.loss.forward_rows(logits, rows, targets)
        else:
            loss = self.loss(logits, targets, indices)
        loss.backward()
        grad = logits.grad
        with torch.no_grad(), threads(matmul_threads):
            weight.grad = grad.t().mm(x)
        bias.grad = grad.sum(dim=0)
        self.optimizer.step()
        if self.row_adam is not None:
            self.row_adam.step(indices, rows.grad)
        return loss.detach()

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (M, K) of features x (M, C)."""
        return F.linear(x, self.head.weight, self.head.bias)

    def estimator_snapshot(self) -> torch.Tensor | dict | None:
        """A cheap copy of ROLE's estimator state; :meth:`estimator_logits` accepts it later. None for other losses."""
        if self.estimator is None:
            return None
        if self.row_adam is not None:
            return self.row_adam.snapshot()
        return self.estimator.detach().clone()

    @torch.no_grad()
    def estimator_logits(self, snapshot: torch.Tensor | dict | None = None) -> torch.Tensor | None:
        """ROLE's (N, K) estimator logits, brought up to date (or as of ``snapshot``); None for other losses."""
        if self.estimator is None:
            return None
        if snapshot is not None:
            return self.row_adam.flushed_values(snapshot) if isinstance(snapshot, dict) else snapshot
        if self.row_adam is not None:
            self.row_adam.flush()
        return self.estimator.detach()


@contextlib.contextmanager
def threads(num: int | None):
    """Run the block with ``num`` torch threads (None: unchanged)."""
    if num is None or num == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_memory_float32(x: Features) -> torch.Tensor:
    """A float32 tensor in RAM: memory maps, read-only arrays and other dtypes are copied, the rest shared."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32).contiguous()
    array = np.asarray(x)
    if isinstance(x, np.memmap) or isinstance(array.base, np.memmap) or not array.flags.writeable or \
            array.dtype != np.float32 or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def _check_xy(name: str, x, y, num_features: int | None = None, num_classes: int | None = None) -> None:
    if x.ndim != 2 or len(y.shape) != 2 or x.shape[0] != y.shape[0]:
        raise MlicError(f"{name}: features must be (N, C) and labels (N, K) with the same N; got {tuple(x.shape)} "
                        f"and {tuple(y.shape)}")
    if num_features is not None and x.shape[1] != num_features:
        raise MlicError(f"{name}: features have {x.shape[1]} channels, the training features {num_features}")
    if num_classes is not None and y.shape[1] != num_classes:
        raise MlicError(f"{name}: labels have {y.shape[1]} classes, the training labels {num_classes}")


@dataclass
class Split:
    """One split's cached features and which of its rows were readable (the others are zero rows)."""

    x: torch.Tensor
    rows: np.ndarray
    messages: list[str]
    """The extraction's messages for the unreadable images."""


class FeatureSteps:
    """The linear probe's steps for :func:`mlic.engine.loop.drive`.

    Args:
        train, val, test: the splits' features (test may be None).
        train_targets: (N, K) training labels in {1, 0, -1} (observed ones), dense or sparse.
        cfg: settings (:meth:`TrainConfig.linear_defaults`).
        loss: the loss built for the data.
        classes: the class names.
        model: the classifier whose head is learned (written at the end); None for in-memory probes.
    """

    mode = "linear"
    saves_every_epoch = False
    resumable_mid_epoch = False

    def __init__(self, train: Split, val: Split, test: Split | None, train_targets, cfg: TrainConfig,
                 loss: nn.Module, classes: list[str], model: nn.Module | None = None) -> None:
        num_images, num_features = train.x.shape
        if cfg.batch_size < 1 or cfg.epochs < 1:
            raise MlicError(f"batch_size and epochs must be ≥ 1, got {cfg.batch_size} and {cfg.epochs}")
        unsupported = {"ema": cfg.ema > 0, "amp": cfg.amp in ("bf16", "fp16"), "clip_grad": cfg.clip_grad > 0,
                       "freeze": bool(cfg.freeze)}
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise MlicError(f"{names}: not used by the linear probe (a head on cached features in fp32); set them "
                            "off, or start from TrainConfig.linear_defaults()")
        self.train, self.val, self.test = train, val, test
        self.cfg, self.classes, self.model = cfg, classes, model
        self.extra: dict = {}
        """What model.json records beside the model (the pretrained weights' source and hash)."""
        self.labels = training_labels(train_targets, loss)  # what training reads; corrections may change it
        self.probe = LinearProbe(num_features, len(classes), num_images, cfg, loss=loss)
        count = len(train.rows)
        self.batch = min(cfg.batch_size, count)
        self.stop = count - count % self.batch if cfg.drop_last else count
        self.scheduler = build_schedule(self.probe.optimizer, cfg, cfg.epochs * self.steps_in(0))
        self.loss = self.probe.loss
        self.estimator_key = next((k for k, p in self.loss.named_parameters() if p is self.probe.estimator), None)
        self.matmul_threads = cfg.matmul_threads or torch.get_num_threads()
        self.order = torch.Generator().manual_seed(cfg.seed + 1)
        self.readable = torch.from_numpy(train.rows)

    @classmethod
    def from_job(cls, job: TrainJob) -> FeatureSteps:
        """Cache (or reuse) the backbone's features of each split in ``job.out/features``; build head and loss."""
        import fcntl

        from mlic.data.features import bad_rows, extract_features
        from mlic.models.classifier import build_model

        model_cfg, out_dir, splits = job.model, Path(job.out), job.splits
        if model_cfg.head != "linear":
            raise MlicError(f"--mode linear trains a linear head; got --head {model_cfg.head}")
        if job.pretrained is None:
            job.log("note: no --pretrained weights: probing features of a randomly initialised backbone")
        from mlic.engine.loop import pretrained_weights, weights_record

        weights = pretrained_weights(job)
        model = build_model(model_cfg, pretrained=weights).eval()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        found = {}
        folder = Path(job.features_dir) if job.features_dir is not None else out_dir / "features"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as lock:  # runs sharing the folder: one extracts, the others wait, then read
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name, ls in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
                if ls is None:
                    continue
                check = BadImageCheck(name, len(ls), job.max_bad_images, job.strict_images)
                path = folder / f"{name}.npy"
                feats = extract_features(ls, model, path, device=device, workers=job.train.workers,
                                         progress=job.progress, check=check)
                rows = np.setdiff1d(np.arange(len(ls)), bad_rows(path))
                if check.count:  # unreadable images are left out, not learned from as all-zero features
                    job.log(f"{name}: skipped {check.count} unreadable images, e.g. {check.messages[0]}")
                found[name] = Split(in_memory_float32(feats), rows, list(check.messages))
        cfg = job.train
        loss = build_loss_for_data(cfg.loss, cfg.loss_args, splits.train.train_targets, cfg.epochs, cfg.seed,
                                   clean=splits.train.targets)
        setup_teaching(job, splits.train, loss, torch.device(device), job.log, per_step=False)  # features: cached
        steps = cls(found["train"], found["val"], found.get("test"), splits.train.train_targets, cfg, loss,
                    splits.train.classes, model)
        steps.extra = {"pretrained": weights_record(job, weights)} if weights else {}
        return steps

    def settings(self) -> dict:
        return {}

    def steps_in(self, epoch: int) -> int:
        return -(-self.stop // self.batch)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_check(self, limit: float, strict: bool) -> BadImageCheck:
        total = self.train.x.shape[0]
        check = BadImageCheck("train", total, total, False)  # the limit was held at extraction
        check.add(self.train.messages)
        return check

    def eval_check(self, split: str, total: int, limit: float, strict: bool) -> BadImageCheck:
        check = BadImageCheck(split, total, total, False)  # the limit was held at extraction
        check.add(getattr(self, split).messages)
        return check

    def train_one_epoch(self, epoch: int, skip: int, partial: EpochProgress, check: BadImageCheck, bar,
                        checkpoint) -> None:
        """One pass over the readable training rows in a fresh random order, batch after batch."""
        before = torch.get_num_threads()
        # Elementwise work on a (batch, K) matrix is too small to gain from a second thread and, on a busy
        # machine, stalls at every op waiting for it; only the matmuls get cfg.matmul_threads.
        torch.set_num_threads(1)
        try:
            perm = self.readable[torch.randperm(len(self.readable), generator=self.order)]
            corrections = hook(self.loss, "apply_corrections")
            x = self.train.x
            for i in range(0, self.stop, self.batch):
                idx = perm[i:i + self.batch]
                loss = self.probe.step(x.index_select(0, idx), batch_rows(self.labels, idx), idx,
                                       self.matmul_threads)
                self.scheduler.step()
                if corrections is not None:
                    corrections(self.labels)
                partial.total += float(loss) * len(idx)
                partial.seen += len(idx)
                bar.advance()
        finally:
            torch.set_num_threads(before)
        if not math.isfinite(partial.mean_loss):
            raise TrainingError(f"linear probe: the loss became {partial.mean_loss} in epoch {epoch + 1}; lower the "
                                f"learning rate (lr={self.cfg.lr:g})")

    def _probabilities(self, split: Split, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> np.ndarray:
        with torch.no_grad(), threads(self.matmul_threads):
            logits = F.linear(split.x, self.probe.head.weight if weight is None else weight,
                              self.probe.head.bias if bias is None else bias)
        scores = torch.sigmoid(logits).numpy()
        if len(split.rows) < len(scores):
            scores = scores.copy()
            scores[np.setdiff1d(np.arange(len(scores)), split.rows)] = np.nan
        return scores

    def train_scores(self, epoch: int, progress: bool) -> torch.Tensor:
        with threads(self.matmul_threads):
            return torch.sigmoid(self.probe.scores(self.train.x))

    def scores(self, split: str, check: BadImageCheck):
        part = getattr(self, split)
        return self._probabilities(part), part.rows

    def snapshot(self) -> dict:
        return {"weight": self.probe.head.weight.detach().clone(), "bias": self.probe.head.bias.detach().clone(),
                "estimator": self.probe.estimator_snapshot(),
                "loss_state": {k: v.detach().clone() for k, v in self.loss.state_dict().items()
                               if k != self.estimator_key}}

    def estimator_logits(self, best) -> torch.Tensor | None:
        """ROLE's (N, K) estimator logits at the best epoch (a row-wise Adam snapshot is flushed once)."""
        kept = best.snapshot
        if kept["estimator"] is not None and "estimator_logits" not in kept:
            kept["estimator_logits"] = self.probe.estimator_logits(kept["estimator"])
        return kept.get("estimator_logits")

    def best_loss_state(self, best) -> dict:
        state = dict(best.snapshot["loss_state"])
        if self.estimator_key is not None:
            state[self.estimator_key] = self.estimator_logits(best).detach().clone()
        return state

    def best_model(self, best) -> tuple[nn.Module, dict]:
        self.model.head.load_state_dict({"fc.weight": best.snapshot["weight"], "fc.bias": best.snapshot["bias"]})
        return self.model, self.best_loss_state(best)

    def published(self, best, out_dir: Path) -> None:
        from mlic.io import atomic_save_npy

        estimator = self.estimator_logits(best)
        if estimator is not None:
            estimated = np.full(tuple(estimator.shape), np.nan, np.float32)
            rows = self.train.rows
            estimated[rows] = torch.sigmoid(estimator[torch.from_numpy(rows)]).numpy()
            atomic_save_npy(out_dir / "estimated_labels.npy", estimated)

    def test_scores(self, best, out_dir: Path | None, check: BadImageCheck):
        return self._probabilities(self.test, best.snapshot["weight"], best.snapshot["bias"]), self.test.rows


@dataclass
class LinearProbeResult:
    """Outcome of :func:`train_linear_probe`, with the weights of the best epoch.

    Attributes:
        weight: (K, C) float32 head weight at the best epoch.
        bias: (K,) float32 head bias at the best epoch.
        best_epoch: 1-based epoch with the highest validation mAP.
        val_map: validation mAP (percent) at the best epoch.
        test_map: test mAP (percent, clean labels) at the best epoch; None without a test set.
        history: one record per epoch, the loop's schema (epoch, train_loss, val_mAP, ...).
        estimator_logits: (N, K) ROLE estimator logits at the best epoch; None for other losses.
        loss_state: the loss's state_dict at the best epoch, for fine-tuning that starts from this run.
        config: the settings of the run.
        seconds: wall-clock time of the whole run.
    """

    weight: np.ndarray
    bias: np.ndarray
    best_epoch: int
    val_map: float
    test_map: float | None
    history: list[dict]
    estimator_logits: np.ndarray | None
    config: TrainConfig
    seconds: float
    loss_state: dict

    def scores(self, features: Features) -> np.ndarray:
        """Logits (M, K) of features (M, C) under the best-epoch head."""
        x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: cached features are read-only
        return F.linear(x, torch.from_numpy(self.weight), torch.from_numpy(self.bias)).numpy()


def train_linear_probe(
    train_x: Features, train_y, val_x: Features, val_y, config: TrainConfig | None = None,
    test_x: Features | None = None, test_y=None, loss: nn.Module | None = None, log=None,
) -> LinearProbeResult:
    """Train a linear head on features in memory with the one loop; nothing is written.

    Args:
        train_x: (N, C) features (float16/32, NumPy memmap or tensor); held in memory as float32.
        train_y: (N, K) training labels in {1, 0, -1} (observed labels for partial-label losses).
        val_x, val_y: validation features and clean labels (unknown entries are ignored, as everywhere).
        config: settings (default :meth:`TrainConfig.linear_defaults` for N images).
        test_x, test_y: optional test features and clean labels.
        loss: the loss built for the data; default built from ``config.loss`` and ``train_y``.
        log: where the epoch lines go (default: nowhere).
    """
    start = time.perf_counter()
    _check_xy("train", train_x, train_y)
    num_images, num_features = train_x.shape
    num_classes = train_y.shape[1]
    _check_xy("val", val_x, val_y, num_features, num_classes)
    if test_x is not None:
        if test_y is None:
            raise MlicError("test_x given without test_y")
        _check_xy("test", test_x, test_y, num_features, num_classes)
    config = config or TrainConfig.linear_defaults(num_images)
    if loss is None:
        loss = build_loss_for_data(config.loss, config.loss_args, train_y, config.epochs, config.seed)
    if not is_sparse(train_y):
        train_y = np.array(train_y, dtype=np.int8, order="C")  # a small copy: labels may be read-only memory maps

    def split(x):
        return Split(in_memory_float32(x), np.arange(x.shape[0]), [])

    steps = FeatureSteps(split(train_x), split(val_x), split(test_x) if test_x is not None else None, train_y,
                         config, loss, [str(k) for k in range(num_classes)])
    val_targets = val_y if is_sparse(val_y) else np.asarray(val_y, dtype=np.int8)
    test_targets = None if test_y is None else test_y if is_sparse(test_y) else np.asarray(test_y, np.int8)
    result = drive(steps, val_targets, test_targets, LoopSettings(log=log))
    best = result.best
    estimator = steps.estimator_logits(best)
    return LinearProbeResult(
        weight=best.snapshot["weight"].numpy(), bias=best.snapshot["bias"].numpy(), best_epoch=best.epoch,
        val_map=best.val_map, test_map=None if result.test_metrics is None else result.test_metrics["mAP"],
        history=result.history, estimator_logits=None if estimator is None else estimator.numpy(), config=config,
        seconds=time.perf_counter() - start, loss_state=steps.best_loss_state(best))


@dataclass
class GridResult:
    """Outcome of :func:`grid_search`: the run with the best validation mAP, and a row per run."""

    best: LinearProbeResult
    runs: list[dict]


def grid_search(train_x: Features, train_y, val_x: Features, val_y, config: TrainConfig | None = None,
                batch_sizes: tuple[int, ...] = (8, 16), lrs: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5),
                test_x: Features | None = None, test_y=None) -> GridResult:
    """Cole et al.'s grid over batch size × learning rate; the run is picked by its best validation mAP.

    Returns:
        The best run and, per run, batch_size, lr, best_epoch, val_map, test_map, seconds.
    """
    config = config or TrainConfig.linear_defaults(train_x.shape[0])
    best: LinearProbeResult | None = None
    runs = []
    for batch_size in batch_sizes:
        for lr in lrs:
            result = train_linear_probe(train_x, train_y, val_x, val_y, replace(config, batch_size=batch_size, lr=lr),
                                        test_x, test_y)
            runs.append({"batch_size": batch_size, "lr": lr, "best_epoch": result.best_epoch,
                         "val_map": result.val_map, "test_map": result.test_map, "seconds": result.seconds})
            if best is None or result.val_map > best.val_map:
                best = result
    return GridResult(best=best, runs=runs)


@dataclass
class SeedSummary:
    """Mean ± sample standard deviation (ddof=1; 0 for one seed) of runs differing only in their seed."""

    seeds: list[int]
    val_maps: list[float]
    test_maps: list[float | None]
    val_mean: float
    val_std: float
    test_mean: float | None
    test_std: float | None

    def __str__(self) -> str:
        text = f"val mAP {self.val_mean:.2f} ± {self.val_std:.2f}"
        if self.test_mean is not None:
            text += f", test mAP {self.test_mean:.2f} ± {self.test_std:.2f}"
        return text + f" over {len(self.seeds)} seeds"


def summarize_seeds(results: list[LinearProbeResult]) -> SeedSummary:
    """Mean ± std of validation and test mAP over runs (e.g. one per seed)."""
    if not results:
        raise MlicError("no results to summarise")

    def stats(values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=np.float64)
        return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0

    val_mean, val_std = stats([r.val_map for r in results])
    tests = [r.test_map for r in results]
    test_mean = test_std = None
    if all(t is not None for t in tests):
        test_mean, test_std = stats(tests)
    return SeedSummary([r.config.seed for r in results], [r.val_map for r in results], tests, val_mean, val_std,
                       test_mean, test_std)


def run_seeds(train_x: Features, train_y, val_x: Features, val_y, config: TrainConfig | None = None,
              seeds: tuple[int, ...] = (0, 1, 2), test_x: Features | None = None, test_y=None) -> SeedSummary:
    """Train once per seed with otherwise equal settings and summarise (mean ± std)."""
    config = config or TrainConfig.linear_defaults(train_x.shape[0])
    results = [train_linear_probe(train_x, train_y, val_x, val_y, replace(config, seed=s), test_x, test_y)
               for s in seeds]
    return summarize_seeds(results)
