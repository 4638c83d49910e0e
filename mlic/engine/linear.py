"""Fast linear probing on cached features (Cole et al.'s "linear_fixed_features" protocol).

The whole training set lives in memory as one float32 tensor; an epoch is a random permutation
of row numbers cut into batches, each batch one ``index_select``, one matmul, the loss, one Adam
step. No DataLoader and no per-example Python. Validation mAP (``mlic.metrics``) is computed
every epoch from one matmul over the validation features; the test set is scored once, at the
epoch chosen by validation mAP (or every epoch with ``eval_test_every_epoch``).

ROLE's label estimator (an N×K parameter) is optimised either as the official code does
(``estimator_update="official"``: a dense Adam group whose gradient is zero outside the batch,
so every row moves every step on its momentum) or lazily (``"fast"``, :class:`RowAdam`): only
the batch's rows are touched, and the motion a row would have made on its momentum while it was
not in a batch is added in closed form when it is next read. Both give the same trajectory up to
Adam's eps in the skipped steps.

Cole et al.'s protocol: Adam, no weight decay, no schedule, 25 epochs, grid batch {8, 16} ×
lr {1e-2, 1e-3, 1e-4, 1e-5}, the epoch and the run picked by validation mAP (clean or observed
validation labels), test mAP (clean labels) reported at that epoch; 20 % of the official train
set held out for validation (:func:`mlic.data.labelset.cole_split`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlic.engine.rowadam import RowAdam
from mlic.errors import MlicError
from mlic.losses import build_loss_for_data
from mlic.metrics import mean_average_precision

ESTIMATOR_UPDATES = ("official", "fast")
Features = np.ndarray | torch.Tensor  # (N, C) features: NumPy (memory maps welcome) or torch


@dataclass
class LinearProbeConfig:
    """Settings of one linear-probe run. The defaults are mlic's fast settings; see :meth:`official`.

    Batch 1024 at lr 7e-3 (64 steps per COCO epoch) does in a few seconds what Cole's batch 16 at
    lr 1e-3 does in minutes, and on COCO-sized synthetic features reached a higher ROLE test mAP in
    25 epochs (bench/linear_probe.py). Do not raise the lr much further on non-negative (ReLU)
    features: Adam's first steps move every weight by about lr, shifting all logits by about
    -lr·Σ_c x_c; once p < eps (1e-5) the official ``-log(p + eps)`` terms stop giving gradient and
    training stalls at chance (seen at lr 2e-2).
    """

    loss: str = "role"
    """Loss name from the registry (full: bce, bce_ls, focal, asl; partial: an, an_ls, wan, epr, role)."""
    loss_args: dict = field(default_factory=dict)
    """Keyword arguments of the loss (num_images / num_classes are filled in when the loss takes them)."""
    epochs: int = 25
    """Passes over the training set."""
    batch_size: int = 1024
    """Rows per optimisation step."""
    lr: float = 7e-3
    """Adam learning rate of the linear head (constant: no schedule)."""
    estimator_lr_mult: float = 10.0
    """Learning-rate multiplier of ROLE's label estimator (official 10)."""
    estimator_update: str = "fast"
    """ROLE estimator optimiser: "official" (dense Adam group) or "fast" (row-wise lazy Adam, same trajectory)."""
    weight_decay: float = 0.0
    """Adam (L2) weight decay on the head's weight matrix only (Cole: 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    fused: bool = True
    """Use torch's fused Adam kernel for the head (same update, one pass; the official code ran the for-loop one)."""
    drop_last: bool = True
    """Drop the incomplete last batch of each epoch (as Cole's DataLoader does)."""
    seed: int = 0
    """Seed of the head's init, the estimator's init and the batch order."""
    val_unknown: str = "negative"
    """Unknown (-1) validation labels count as "negative" (Cole's observed-validation protocol) or are "ignore"d."""
    eval_test_every_epoch: bool = False
    """Score the test set every epoch (history gets test mAP); otherwise only at the best epoch."""
    num_threads: int | None = 1
    """torch threads for the matmuls (None: torch's current setting); everything else runs on one thread.
    One is the robust choice on 2 cores: a second thread gains ~1.5x on the matmuls of an idle machine
    but loses ~2x when other processes hold a core (the COCO-sized ROLE run: 43 s on 1 thread, 82 s on 2)."""
    progress: bool = False
    """Show a progress bar over epochs."""

    @classmethod
    def official(cls, **overrides) -> LinearProbeConfig:
        """Cole et al.'s settings: batch 16, lr 1e-3, dense estimator Adam (override any field)."""
        base = dict(batch_size=16, lr=1e-3, estimator_update="official", fused=False)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LinearProbeConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise MlicError(f"unknown linear probe config fields: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)


@dataclass
class LinearProbeResult:
    """Outcome of :func:`train_linear_probe`, with the weights of the best epoch.

    Attributes:
        weight: (K, C) float32 head weight at the best epoch.
        bias: (K,) float32 head bias at the best epoch.
        best_epoch: 0-based epoch with the highest validation mAP.
        val_map: validation mAP (percent) at the best epoch.
        test_map: test mAP (percent, clean labels) at the best epoch; None without a test set.
        history: one dict per epoch: epoch, loss (mean batch objective), val_map, seconds, [test_map].
        estimator_logits: (N, K) ROLE estimator logits at the best epoch; None for other losses.
        loss_state: the loss's state_dict at the best epoch (its estimator, pseudo-labels, epoch), for
            fine-tuning that starts from this run.
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
    config: LinearProbeConfig
    seconds: float
    loss_state: dict = field(default_factory=dict)

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits (M, K) of features (M, C) under the best-epoch head."""
        x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: cached features are read-only
        return F.linear(x, torch.from_numpy(self.weight), torch.from_numpy(self.bias)).numpy()


class LinearProbe:
    """A linear head (K×C), its loss and its optimiser(s); :meth:`step` is one optimisation step.

    A loss with learnable state (ROLE's (N, K) estimator: the loss's parameters) is optimised too, at lr ×
    ``estimator_lr_mult``; when the loss offers the protocol's ``forward_rows`` hook, lazily, row by row.

    Args:
        num_features: C.
        num_classes: K.
        num_images: N, training-set size.
        config: run settings.
        observed: (N, K) observed training labels in {1, 0, -1}; the loss is built from them (ROLE's
            estimator starts from them) unless ``loss`` is given.
        dtype: parameter dtype (float32; float64 for conformance checks).
        loss: the loss, already built for the data (:func:`mlic.losses.build_loss_for_data`).
    """

    def __init__(self, num_features: int, num_classes: int, num_images: int, config: LinearProbeConfig,
                 observed: np.ndarray | torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 loss: nn.Module | None = None) -> None:
        if config.estimator_update not in ESTIMATOR_UPDATES:
            raise MlicError(f"estimator_update must be one of {ESTIMATOR_UPDATES}, got {config.estimator_update!r}")
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
        self.optimizer = torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                          fused=fused or None)

    def step(self, x: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
             matmul_threads: int | None = None) -> torch.Tensor:
        """One step on features x (B, C), targets (B, K) in {1, 0, -1}, dataset rows indices (B,).

        The head's two matmuls (logits, weight gradient) are written out, so that they alone can run
        on ``matmul_threads`` threads while the small elementwise work stays on the caller's setting.

        Returns the batch objective (detached scalar).
        """
        self.optimizer.zero_grad(set_to_none=True)
        weight, bias = self.head.weight, self.head.bias
        with torch.no_grad(), _threads(matmul_threads):
            logits = torch.addmm(bias, x, weight.t())
        logits.requires_grad_(True)
        if self.row_adam is not None:
            rows = self.row_adam.catch_up(indices).requires_grad_(True)
            loss = self.loss.forward_rows(logits, rows, targets)
        else:
            loss = self.loss(logits, targets, indices)
        loss.backward()
        grad = logits.grad
        with torch.no_grad(), _threads(matmul_threads):
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
def _threads(num: int | None):
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


def _in_memory_float32(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 tensor in RAM: memory maps, read-only arrays and other dtypes are copied, the rest shared."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32).contiguous()
    array = np.asarray(x)
    if isinstance(x, np.memmap) or isinstance(array.base, np.memmap) or not array.flags.writeable or \
            array.dtype != np.float32 or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def _map(scores: torch.Tensor, targets: np.ndarray, unknown: str) -> float:
    if unknown == "negative":
        targets = (targets == 1).astype(np.int8)
    elif unknown != "ignore":
        raise MlicError(f"val_unknown must be 'negative' or 'ignore', got {unknown!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # empty classes count as AP 0, reported once up front
        return mean_average_precision(scores.numpy(), targets)


def _check_xy(name: str, x, y, num_features: int | None = None, num_classes: int | None = None) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise MlicError(f"{name}: features must be (N, C) and labels (N, K) with the same N; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if num_features is not None and x.shape[1] != num_features:
        raise MlicError(f"{name}: features have {x.shape[1]} channels, the training features {num_features}")
    if num_classes is not None and y.shape[1] != num_classes:
        raise MlicError(f"{name}: labels have {y.shape[1]} classes, the training labels {num_classes}")


def train_linear_probe(
    train_x: np.ndarray | torch.Tensor, train_y: np.ndarray, val_x: np.ndarray | torch.Tensor, val_y: np.ndarray,
    config: LinearProbeConfig | None = None, test_x: np.ndarray | torch.Tensor | None = None,
    test_y: np.ndarray | None = None, loss: nn.Module | None = None,
) -> LinearProbeResult:
    """Train a linear head on cached features; pick the epoch by validation mAP.

    Args:
        train_x: (N, C) features (float16/32, NumPy memmap or tensor); held in memory as float32.
        train_y: (N, K) training labels in {1, 0, -1} (observed labels for partial-label losses).
        val_x: (M, C) validation features.
        val_y: (M, K) validation labels: clean, or observed (unknowns count as negatives by default).
        config: settings (default :class:`LinearProbeConfig`).
        test_x: optional (T, C) test features.
        test_y: (T, K) clean test labels.
        loss: the loss built for the data (:func:`mlic.losses.build_loss_for_data`); default: built from
            ``config.loss`` and ``train_y``. Its protocol hooks run as in fine-tuning: ``start_epoch``,
            ``wants_predictions`` / ``end_epoch`` (with the training set's scores), ``apply_corrections``
            (into the training labels the next batches read).

    Returns:
        The best epoch's head, its validation and test mAP, the per-epoch history and ROLE's estimator.
    """
    config = config or LinearProbeConfig()
    start = time.perf_counter()
    _check_xy("train", train_x, train_y)
    num_images, num_features = train_x.shape
    num_classes = train_y.shape[1]
    _check_xy("val", val_x, val_y, num_features, num_classes)
    if test_x is not None:
        if test_y is None:
            raise MlicError("test_x given without test_y")
        _check_xy("test", test_x, test_y, num_features, num_classes)
    if config.batch_size < 1 or config.epochs < 1:
        raise MlicError(f"batch_size and epochs must be ≥ 1, got {config.batch_size} and {config.epochs}")
    threads = torch.get_num_threads()
    # Elementwise work on a (batch, K) matrix is too small to gain from a second thread and, on a
    # busy machine, stalls at every op waiting for it; only the matmuls get config.num_threads.
    torch.set_num_threads(1)
    try:
        return _train(train_x, train_y, val_x, val_y, config, test_x, test_y, num_images, num_features, num_classes,
                      start, threads, loss)
    finally:
        torch.set_num_threads(threads)


def _train(train_x, train_y, val_x, val_y, config, test_x, test_y, num_images, num_features, num_classes, start,
           threads, loss) -> LinearProbeResult:
    train_y = np.array(train_y, dtype=np.int8, order="C")  # a small copy: labels may be read-only memory maps
    val_y = np.array(val_y, dtype=np.int8)
    x_train = _in_memory_float32(train_x)
    y_train = torch.from_numpy(train_y)
    x_val = _in_memory_float32(val_x)
    x_test = _in_memory_float32(test_x) if test_x is not None else None
    test_y = np.asarray(test_y, dtype=np.int8) if test_y is not None else None
    empty = int(((val_y == 1).sum(axis=0) == 0).sum())
    if empty:
        warnings.warn(f"{empty} of {num_classes} classes have no positive validation label; they count as AP 0",
                      UserWarning, stacklevel=3)

    probe = LinearProbe(num_features, num_classes, num_images, config, observed=train_y, loss=loss)
    hooks = {name: getattr(probe.loss, name, None)  # the loss protocol's optional hooks (mlic.losses)
             for name in ("start_epoch", "wants_predictions", "end_epoch", "apply_corrections")}
    estimator_key = next((k for k, p in probe.loss.named_parameters() if p is probe.estimator), None)
    matmul_threads = config.num_threads or threads
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    batch = min(config.batch_size, num_images)
    stop = num_images - num_images % batch if config.drop_last else num_images

    history: list[dict] = []
    best: dict = {"val_map": -math.inf}
    progress = _progress(config.progress, config.epochs)
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(num_images, generator=order_gen)
        total = torch.zeros((), dtype=torch.float64)
        steps = 0
        if hooks["start_epoch"] is not None:
            hooks["start_epoch"](epoch)
        for i in range(0, stop, batch):
            idx = perm[i:i + batch]
            total += probe.step(x_train.index_select(0, idx), y_train.index_select(0, idx), idx, matmul_threads)
            if hooks["apply_corrections"] is not None:
                hooks["apply_corrections"](y_train)
            steps += 1
        if hooks["wants_predictions"] is not None and hooks["wants_predictions"](epoch):
            with _threads(matmul_threads):
                hooks["end_epoch"](epoch, torch.sigmoid(probe.scores(x_train)))
        mean_loss = float(total) / max(steps, 1)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"linear probe: the loss became {mean_loss} in epoch {epoch + 1}; lower the "
                                     f"learning rate (lr={config.lr:g})")
        with _threads(matmul_threads):
            val_scores = probe.scores(x_val)
        val_map = _map(val_scores, val_y, config.val_unknown)
        record = {"epoch": epoch, "loss": mean_loss, "val_map": val_map}
        if x_test is not None and config.eval_test_every_epoch:
            with _threads(matmul_threads):
                test_scores = probe.scores(x_test)
            record["test_map"] = _map(test_scores, test_y, "ignore")
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if val_map > best["val_map"]:
            best = {"val_map": val_map, "epoch": epoch, "weight": probe.head.weight.detach().clone(),
                    "bias": probe.head.bias.detach().clone(), "estimator": probe.estimator_snapshot(),
                    "loss_state": {k: v.detach().clone() for k, v in probe.loss.state_dict().items()
                                   if k != estimator_key}}
        if progress is not None:
            progress[0].update(progress[1], advance=1, description=f"epoch {epoch + 1}: val mAP {val_map:.2f}")
    if progress is not None:
        progress[0].stop()

    test_map = None
    if x_test is not None:
        if config.eval_test_every_epoch:
            test_map = history[best["epoch"]]["test_map"]
        else:
            with _threads(matmul_threads):
                test_scores = F.linear(x_test, best["weight"], best["bias"])
            test_map = _map(test_scores, test_y, "ignore")
    estimator = None if best["estimator"] is None else probe.estimator_logits(best["estimator"])
    loss_state = dict(best["loss_state"])
    if estimator_key is not None:
        loss_state[estimator_key] = estimator.detach().clone()
    return LinearProbeResult(
        weight=best["weight"].numpy(), bias=best["bias"].numpy(), best_epoch=best["epoch"], val_map=best["val_map"],
        test_map=test_map, history=history, estimator_logits=None if estimator is None else estimator.numpy(),
        config=copy.deepcopy(config), seconds=time.perf_counter() - start, loss_state=loss_state,
    )


def _progress(enabled: bool, epochs: int):
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress(transient=False)
    bar.start()
    return bar, bar.add_task("linear probe", total=epochs)
