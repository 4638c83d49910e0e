"""Optimisation pieces of both training modes: parameter groups, optimisers, schedules, EMA, and the lazy
row-wise Adam for a large table of which each step reads a few rows (ROLE's label estimator in the linear
probe, ``estimator_update="fast"``).
"""

from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3
from torch import nn

from mlic.config import TrainConfig
from mlic.errors import MlicError


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


def build_optimizer(groups: list[dict], cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or Adam (L2 decay, Cole et al.'s probe) over ``groups``, as ``cfg.optimizer`` says."""
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=fused)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """OneCycle (cosine, ≥ 1 warm-up step) or a constant learning rate (``cfg.schedule``)."""
    if cfg.schedule == "onecycle" and total_steps >= 4:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
            pct_start=min(0.5, max(cfg.pct_start, 1.5 / total_steps)), anneal_strategy="cos")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant, or too few steps for one


class EMA(ModelEmaV3):
    """timm's ModelEmaV3 (parameters and buffers, foreach lerp) with the warm-up Query2Label's and YOLO's
    EMA use: decay ``min(decay, (1 + n) / (10 + n))`` at update n, rather than timm's power warm-up."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, decay=decay)
        self.module.eval().requires_grad_(False)
        self.updates = 0

    def get_decay(self, step: int | None = None) -> float:
        n = self.updates if step is None else step
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        self.updates += 1
        super().update(model, step=self.updates)


class RowAdam:
    """Adam on an (N, K) parameter whose gradient lives in a few rows per step, touching only those rows.

    Dense ``torch.optim.Adam`` on such a parameter (the official ROLE estimator) moves every row at
    every step: rows outside the batch have zero gradient but keep sliding on their momentum while
    m ← β1·m and v ← β2·v. A row's value is only read when it is in a batch, so here that motion is
    added in closed form when the row is next read (:meth:`catch_up`, or :meth:`flush` for all
    rows), which gives the dense trajectory at the cost of the batch's rows: exactly without Adam's
    eps, and to first order in eps/√v with it (see :meth:`_coast`). Use::

        values = row_adam.catch_up(rows)   # (R, K), rows distinct
        ... loss from values, gradient (R, K) ...
        row_adam.step(rows, grad)

    Args:
        param: the (N, K) parameter, updated in place.
        lr: learning rate.
        betas: Adam betas.
        eps: Adam epsilon.
        tolerance: coasting motion beyond this fraction of the first step's is dropped (sets the
            number of steps summed, ≈200 for the default betas).
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, tolerance: float = 1e-10) -> None:
        if param.ndim != 2:
            raise MlicError(f"RowAdam needs a 2-D parameter, got shape {tuple(param.shape)}")
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        # first and second moments side by side, so a batch's rows are one gather and one scatter
        self.moments = torch.zeros(param.shape[0], 2, param.shape[1], dtype=param.dtype, device=param.device)
        self.last = torch.zeros(param.shape[0], dtype=torch.long, device=param.device)
        self.steps = 0
        beta1, beta2 = betas
        ratio = beta1 / math.sqrt(beta2)
        horizon = max(1, int(math.ceil(math.log(tolerance) / math.log(ratio)))) if 0 < ratio < 1 else 1
        j = torch.arange(1, horizon + 1, dtype=torch.float64)
        self._j = j.long().to(param.device)
        self._ratio_pow = (ratio**j).to(param.dtype).to(param.device)
        self._ratio_pow_eps = (ratio**j * beta2 ** (-j / 2)).to(param.dtype).to(param.device)
        self._w = self._wu = torch.empty(0)
        self._pending: tuple | None = None

    def _tables(self, upto: int) -> None:
        """Bias-correction tables √bc2/bc1 and bc2/bc1 over absolute steps 0..upto (grown by doubling)."""
        if upto < self._w.numel():
            return
        s = torch.arange(max(upto + 1, 2 * self._w.numel(), 1024), dtype=torch.float64).clamp_min(1)
        beta1, beta2 = self.betas
        bc1, bc2 = 1 - beta1**s, 1 - beta2**s
        self._w = (bc2.sqrt() / bc1).to(self.param.dtype).to(self.param.device)
        self._wu = (bc2 / bc1).to(self.param.dtype).to(self.param.device)

    def _coast(self, last: torch.Tensor, m: torch.Tensor, v: torch.Tensor, now: int | None = None) -> torch.Tensor:
        """Apply the zero-gradient steps last+1 … now to rows last stepped at ``last`` (R,); m, v (R, K) in place.

        Coasting step j (absolute step last + j) moves an entry by ``-lr · m/√v · w_j / (1 + (eps/√v)·u_j)``
        with ``w_j = (β1/√β2)^j · √bc2/bc1`` and ``u_j = √bc2 / β2^(j/2)``. The sum over j is taken as
        ``S / (1 + (eps/√v)·U/S)`` with S = Σ w_j and U = Σ w_j u_j: exact without eps, right to first
        order in eps/√v, and bounded where eps dominates. S and U depend on ``last`` only, so they are
        computed once per distinct value.

        Returns the parameter change (R, K).
        """
        now = self.steps if now is None else now
        self._tables(now + self._j.numel() + 1)
        distinct, inverse = torch.unique(last, return_inverse=True)
        skipped = now - distinct
        steps = distinct[:, None] + self._j
        live = self._j <= skipped[:, None]
        total = (self._w[steps] * self._ratio_pow * live).sum(dim=1)
        eps_total = (self._wu[steps] * self._ratio_pow_eps * live).sum(dim=1)
        eps_weight = eps_total * (self.eps / total.clamp_min(1e-30))
        skipped_f = skipped.to(m.dtype)
        beta1, beta2 = self.betas
        decay = torch.stack([torch.pow(torch.full_like(skipped_f, beta1), skipped_f),
                             torch.pow(torch.full_like(skipped_f, beta2), skipped_f)], dim=1)
        # a moment decayed by more than 1e-20 moves nothing any more; zero it rather than let it
        # wander into the (very slow) subnormal range
        decay = decay.masked_fill_(decay < 1e-20, 0.0)
        per_row = torch.cat([(total * -self.lr)[:, None], eps_weight[:, None], decay], dim=1)[inverse]
        delta = m * per_row[:, 0:1] / (v.sqrt() + per_row[:, 1:2]).clamp_min(1e-30)
        m.mul_(per_row[:, 2:3])
        v.mul_(per_row[:, 3:4])
        return delta

    @torch.no_grad()
    def catch_up(self, rows: torch.Tensor) -> torch.Tensor:
        """Bring distinct rows (R,) up to the current step; returns their values (R, K), a copy."""
        moments = self.moments[rows]
        values = self.param.data[rows]
        values += self._coast(self.last[rows], moments[:, 0], moments[:, 1])
        self._pending = (rows, values, moments)
        return values

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One Adam step with gradient ``grad`` (R, K) on the rows last passed to :meth:`catch_up`, zero elsewhere."""
        if self._pending is None or self._pending[0] is not rows:
            raise RuntimeError("RowAdam.step: call catch_up(rows) with the same rows first")
        _, values, moments = self._pending
        self._pending = None
        beta1, beta2 = self.betas
        self.steps += 1
        t = self.steps
        m, v = moments[:, 0], moments[:, 1]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(self.eps)
        values = values.detach().addcdiv_(m, denom, value=-self.lr / (1 - beta1**t))
        self._write(rows, values, moments, t)

    def _write(self, rows: torch.Tensor, values: torch.Tensor, moments: torch.Tensor, t: int) -> None:
        self.param.data[rows] = values
        self.moments[rows] = moments
        self.last[rows] = t

    @torch.no_grad()
    def flush(self, chunk: int = 65536) -> None:
        """Bring every row up to the current step (call before reading the whole parameter)."""
        stale = torch.nonzero(self.last < self.steps).flatten()
        for start in range(0, stale.numel(), chunk):
            rows = stale[start:start + chunk]
            values = self.catch_up(rows)
            _, _, moments = self._pending
            self._pending = None
            self._write(rows, values, moments, self.steps)

    def snapshot(self) -> dict:
        """A copy of the state (cheaper than :meth:`flush`); :meth:`flushed_values` turns it into values later."""
        return {"values": self.param.detach().clone(), "moments": self.moments.clone(), "last": self.last.clone(),
                "steps": self.steps}

    @torch.no_grad()
    def flushed_values(self, snapshot: dict, chunk: int = 65536) -> torch.Tensor:
        """The (N, K) values a :meth:`flush` would have given at the time of ``snapshot`` (which is consumed)."""
        values, moments, last = snapshot["values"], snapshot["moments"], snapshot["last"]
        for start in range(0, values.shape[0], chunk):
            part = moments[start:start + chunk]
            values[start:start + chunk] += self._coast(last[start:start + chunk], part[:, 0], part[:, 1],
                                                       snapshot["steps"])
        return values

    @property
    def exp_avg(self) -> torch.Tensor:
        """Adam's first moment (N, K), as of each row's last update (see :meth:`flush`)."""
        return self.moments[:, 0]

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        """Adam's second moment (N, K), as of each row's last update."""
        return self.moments[:, 1]

    def state_dict(self) -> dict:
        return {"moments": self.moments, "last": self.last, "steps": self.steps}
