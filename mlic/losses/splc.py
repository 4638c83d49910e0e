"""Hill and SPLC (Zhang et al. 2021, "Simple and Robust Loss Design for Multi-Label Learning with Missing Labels").

Their code knows positives and "everything else" (a negative that may be a missing positive): an
mlic negative (0) and an unknown (-1) are therefore treated alike, as the official code treats
every 0 of its labels. With z the logit, σ the sigmoid, m the margin and γ gamma:

- Hill, positive: ``−(1 − σ(z − m))^γ · log σ(z − m)`` (focal loss on a margin-shifted logit);
  other: ``(λ − σ(z)) · σ(z)²``.
- SPLC, positive: the same focal term as Hill's; other: ``−σ(z)^γ · log(1 − σ(z))`` (focal),
  except, from epoch ``change_epoch`` on (0-based, as their loop index), entries with σ(z) > τ
  become pseudo-positives for this step: ``−(1 − σ(z))^γ · log σ(z)`` (no margin). Pseudo-labels
  are recomputed from each batch and never stored; the epoch is the only state.

Nothing is detached (gradients flow through the focal weights). The official Hill takes
``log`` of the sigmoid, which gives NaN when σ(z − m) underflows to 0 on a non-positive entry
(z − m < −709 in float64); this version masks with ``where`` and stays finite there.
Reductions as theirs: "sum" (default, their training), "mean" (Σ / (B·K)) or "none" ((B, K)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlic.losses.base import EpochLoss, LossInputError, batch_inputs
from mlic.registry import register_loss

REDUCTIONS = ("sum", "mean", "none")


def _prepare(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    if reduction not in REDUCTIONS:
        raise LossInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits, targets = batch_inputs(logits, targets)
    return logits, targets == 1


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if reduction == "mean" else loss


def _focal_positive(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """−(1 − σ(z))^γ · log σ(z), elementwise."""
    return -(1 - torch.sigmoid(z)).pow(gamma) * F.logsigmoid(z)


def hill_loss(
    logits: torch.Tensor, targets: torch.Tensor, lamb: float = 1.5, margin: float = 1.0, gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Hill loss on logits (B, K) with targets (B, K) in {1, 0, -1} (0 and -1 alike); see the module docstring."""
    logits, positive = _prepare(logits, targets, reduction)
    p = torch.sigmoid(logits)
    loss = torch.where(positive, _focal_positive(logits - margin, gamma), (lamb - p) * p * p)
    return _reduce(loss, reduction)


def splc_targets(logits: torch.Tensor, positive: torch.Tensor, tau: float, margin: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPLC's shifted logits z' (B, K) and pseudo-positive mask (σ(z') > τ on non-positive entries)."""
    shifted = torch.where(positive, logits - margin, logits)
    with torch.no_grad():
        pseudo = ~positive & (torch.sigmoid(shifted) > tau)
    return shifted, pseudo


def splc_loss(
    logits: torch.Tensor, targets: torch.Tensor, correct: bool, tau: float = 0.6, margin: float = 1.0,
    gamma: float = 2.0, reduction: str = "sum",
) -> torch.Tensor:
    """SPLC on logits (B, K), targets (B, K) in {1, 0, -1}; ``correct`` switches the pseudo-positives on."""
    logits, positive = _prepare(logits, targets, reduction)
    shifted, pseudo = splc_targets(logits, positive, tau, margin)
    target = positive | pseudo if correct else positive
    negative = -torch.sigmoid(shifted).pow(gamma) * F.logsigmoid(-shifted)
    loss = torch.where(target, _focal_positive(shifted, gamma), negative)
    return _reduce(loss, reduction)


@register_loss("hill")
class Hill(torch.nn.Module):
    """Hill (λ = 1.5, margin 1, γ = 2, summed, as theirs everywhere)."""

    paper = "Zhang et al., Simple and Robust Loss Design for Multi-Label Learning with Missing Labels, 2021"
    labels = "partial"

    def __init__(self, lamb: float = 1.5, margin: float = 1.0, gamma: float = 2.0, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise LossInputError(f"hill reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.lamb, self.margin, self.gamma, self.reduction = lamb, margin, gamma, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return hill_loss(logits, targets, self.lamb, self.margin, self.gamma, self.reduction)


@register_loss("splc")
class SPLC(EpochLoss):
    """SPLC (τ = 0.6, from the second epoch, margin 1, γ = 2, summed); call ``start_epoch(epoch)`` each epoch."""

    paper = "Zhang et al., Simple and Robust Loss Design for Multi-Label Learning with Missing Labels, 2021"
    labels = "partial"

    def __init__(self, tau: float = 0.6, change_epoch: int = 1, margin: float = 1.0, gamma: float = 2.0,
                 reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise LossInputError(f"splc reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0 < tau < 1:
            raise LossInputError(f"splc tau is a probability threshold in (0, 1), got {tau}")
        self.tau, self.change_epoch, self.margin, self.gamma, self.reduction = (
            tau, int(change_epoch), margin, gamma, reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return splc_loss(logits, targets, self._epoch >= self.change_epoch, self.tau, self.margin, self.gamma,
                         self.reduction)
