"""GR Loss: Chen et al., "Boosting Single Positive Multi-label Classification with Generalized Robust Loss", IJCAI 2024.

With p = σ(logit) and p̄ = p without gradient, per entry:

- observed positive: ``−log(p + 1e-7)``;
- unknown: ``V · (K · (1 − p^q2)/q2 + (1 − K) · (1 − (1 − p)^q3)/q3)`` with the constants
  ``K = σ(w·p̄ + b)`` and ``V = exp(−½((p̄ − μ)/σ)²)``;
- observed negative (0): ``−log(1 − p + 1e-7)``. The official code gives such entries 0 (its data
  have none); a certain negative is mlic's choice, as in ``partial.py``.

The value is the mean over all B·K entries. (w, b, μ, σ) move linearly over the epochs; the
official schedule (1-based epoch e, T = num_epochs, n = linear_init) is offset by one epoch
between the two pairs: w, b use ``max(e − n − 1, 0)/(T − n)`` (so they never reach wT, bT) and
μ, σ use ``max(e − n, 0)/(T − n)`` (already one step in at the first fine-tuned epoch).
``schedule="official"`` (default) reproduces it; ``schedule="endpoints"`` moves all four from
their start values at epoch n + 1 to their end values at the last epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mlic.losses.base import EpochLoss, LossInputError, batch_inputs, require_unknown
from mlic.registry import register_loss

LOG_EPSILON = 1e-7
SCHEDULES = ("official", "endpoints")


def gr_schedule(epoch: int, num_epochs: int, linear_init: int, beta: Sequence[float], alpha: Sequence[float],
                schedule: str = "official") -> tuple[float, float, float, float]:
    """(w, b, μ, σ) during 0-based ``epoch``; ``beta = [w0, wT, b0, bT]``, ``alpha = [μ0, σ0, μT, σT]``."""
    w0, wt, b0, bt = beta
    mu0, sigma0, mut, sigmat = alpha
    span = num_epochs - linear_init
    if schedule == "official":
        step_wb, step_mu = max(epoch - linear_init, 0), max(epoch - linear_init + 1, 0)
        return (w0 + (wt - w0) * step_wb / span, b0 + (bt - b0) * step_wb / span,
                mu0 + (mut - mu0) * step_mu / span, sigma0 + (sigmat - sigma0) * step_mu / span)
    if schedule != "endpoints":
        raise LossInputError(f"gr schedule must be one of {SCHEDULES}, got {schedule!r}")
    frac = min(max(epoch - linear_init, 0) / (span - 1), 1.0) if span > 1 else 1.0
    return w0 + (wt - w0) * frac, b0 + (bt - b0) * frac, mu0 + (mut - mu0) * frac, sigma0 + (sigmat - sigma0) * frac


def gr_weights(probs: torch.Tensor, w: float, b: float, mu: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The constants K = σ(w·p + b) and V = exp(−½((p − μ)/σ)²) of (detached) probabilities (B, K)."""
    k = 1 / (1 + torch.exp(-(w * probs + b)))
    v = torch.exp(-0.5 * ((probs - mu) / sigma) ** 2)
    return k, v


def gr_loss(logits: torch.Tensor, targets: torch.Tensor, w: float, b: float, mu: float, sigma: float,
            q2: float = 0.01, q3: float = 1.0, eps: float = LOG_EPSILON) -> torch.Tensor:
    """GR loss on logits (B, K) with targets (B, K) in {1, 0, -1} at schedule values (w, b, μ, σ); a scalar."""
    logits, targets = batch_inputs(logits, targets)
    p = torch.sigmoid(logits)
    k, v = gr_weights(p.detach(), w, b, mu, sigma)
    unknown_term = v * (k * (1 - p.pow(q2)) / q2 + (1 - k) * (1 - (1 - p).pow(q3)) / q3)
    loss = torch.where(targets == 1, -torch.log(p + eps), -torch.log(1 - p + eps))
    return torch.where(targets == -1, unknown_term, loss).mean()


class GRSchedule:
    """GR's (w, b, μ, σ) schedule over the run's epochs and its exponents q2, q3: one piece for every loss built
    on it (``gr``, AEVLP's GPR loss). Mixed in before an :class:`EpochLoss`."""

    def init_schedule(self, name: str, num_epochs: int, linear_init: int, beta: Sequence[float],
                      alpha: Sequence[float], q: Sequence[float], schedule: str) -> None:
        """Check and keep the schedule's settings; ``name`` is the loss named in the messages."""
        if len(beta) != 4 or len(alpha) != 4 or len(q) != 2:
            raise LossInputError(f"{name} takes beta=[w0, wT, b0, bT], alpha=[mu0, sigma0, muT, sigmaT], q=[q2, q3]; "
                                 f"got {len(beta)}, {len(alpha)} and {len(q)} values")
        if not 0 <= linear_init < num_epochs:
            raise LossInputError(f"{name} needs 0 <= linear_init < num_epochs, got {linear_init} and {num_epochs}")
        if schedule not in SCHEDULES:
            raise LossInputError(f"{name} schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule_name = name
        self.num_epochs, self.linear_init, self.schedule = int(num_epochs), int(linear_init), schedule
        self.beta, self.alpha = [float(x) for x in beta], [float(x) for x in alpha]
        self.q2, self.q3 = float(q[0]), float(q[1])

    def start_epoch(self, epoch: int) -> None:
        if int(epoch) >= self.num_epochs:
            raise LossInputError(f"{self.schedule_name} was built for num_epochs={self.num_epochs} (its schedule's "
                                 f"length); pass num_epochs = the run's epochs, got epoch {epoch}")
        super().start_epoch(epoch)

    def schedule_values(self) -> tuple[float, float, float, float]:
        """(w, b, μ, σ) of the current epoch."""
        return gr_schedule(self._epoch, self.num_epochs, self.linear_init, self.beta, self.alpha, self.schedule)


@register_loss("gr")
class GRLoss(GRSchedule, EpochLoss):
    """GR Loss; call ``start_epoch(epoch)`` before each epoch (0-based, < num_epochs).

    Args:
        num_epochs: T, the run's epochs (the schedule's length; official 8).
        linear_init: n, epochs trained with the backbone frozen first (official 0).
        beta: [w0, wT, b0, bT] of K (official [0, 2, -2, -2]).
        alpha: [μ0, σ0, μT, σT] of V (official [0.5, 2, 0.8, 0.5]; note the other order).
        q: [q2, q3] (official [0.01, 1]).
        schedule: "official" (offset, see the module docstring) or "endpoints".
    """

    paper = "Chen et al., Boosting Single Positive Multi-label Classification with Generalized Robust Loss, IJCAI 2024"
    labels = "single positive"

    def __init__(self, num_epochs: int = 8, linear_init: int = 0, beta: Sequence[float] = (0.0, 2.0, -2.0, -2.0),
                 alpha: Sequence[float] = (0.5, 2.0, 0.8, 0.5), q: Sequence[float] = (0.01, 1.0),
                 schedule: str = "official") -> None:
        super().__init__()
        self.init_schedule("gr", num_epochs, linear_init, beta, alpha, q, schedule)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        require_unknown("gr", targets)
        w, b, mu, sigma = self.schedule_values()
        return gr_loss(logits, targets, w, b, mu, sigma, self.q2, self.q3)
