"""EM and EM + APL (Zhou et al., "Acknowledging the Unknown for Multi-label Learning with Single Positive Labels").

Everything is in probability space with Cole's ``log(x + 1e-5)``, as the official code. With
p = σ(logit), per entry:

- observed positive: ``−log(p + ε)``;
- unknown: ``α · (p·log(p + ε) + (1 − p)·log(1 − p + ε))`` (EM: minus α times the binary entropy,
  pushing unknown predictions towards ½);
- unknown with an APL pseudo-label of soft target s (em_apl): ``−β · (s·log(p + ε) + (1 − s)·log(1 − p + ε))``
  instead of the entropy term;
- observed negative (0): ``−log(1 − p + ε)``. The official code has no observed negatives (its EM
  asserts there are none); a certain negative is mlic's choice, as in ``partial.py``.

The value is the mean over all B·K entries. Nothing is detached but the stored soft targets.

APL (asymmetric pseudo-labelling), official schedule: after each epoch e (1-based) with
e ≥ ``warmup_epochs``, a no-grad pass over the whole training set gives p; per class j, the
``int(neg_proportion · U_j / (num_epochs − warmup_epochs))`` still-unlabelled unknown entries with
the lowest p (U_j = the class's unknown count in ``observed``) get the soft target s = p, kept for
the rest of training (never revised). Differences, documented: candidates are ordered by a stable
sort (numpy's argsort orders ties arbitrarily); ``wants_predictions`` is False after the last
epoch, whose update the official code makes although nothing trains on it (``end_epoch`` still
applies it when called); the official update is skipped when the training loader has a single
batch (it runs on the last batch of a loop that skips batch 0) — here it always runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mlic.losses.base import EpochLoss, LossInputError, batch_inputs, require_indices, require_unknown
from mlic.losses.full import log_sigmoids
from mlic.registry import register_loss

LOG_EPSILON = 1e-5


def em_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.1, pseudo_targets: torch.Tensor | None = None,
    beta: float = 0.9, eps: float = LOG_EPSILON,
) -> torch.Tensor:
    """EM (and, with ``pseudo_targets``, EM + APL) on one batch; a scalar.

    Args:
        logits: (B, K).
        targets: (B, K) int8 in {1, 0, -1}.
        alpha: weight of the entropy term on unknown entries.
        pseudo_targets: (B, K) soft targets s of pseudo-labelled unknown entries, NaN elsewhere.
        beta: weight of the soft-target BCE on pseudo-labelled entries.
        eps: the log epsilon (official 1e-5).
    """
    logits, targets = batch_inputs(logits, targets)
    p = torch.sigmoid(logits)
    logp, log1mp = log_sigmoids(logits, eps)
    unknown = targets == -1
    loss = torch.where(targets == 1, -logp, -log1mp)
    loss = torch.where(unknown, alpha * (p * logp + (1 - p) * log1mp), loss)
    if pseudo_targets is not None:
        s = pseudo_targets.to(device=logits.device, dtype=logits.dtype)
        labelled = unknown & ~torch.isnan(s)
        s = torch.nan_to_num(s)
        loss = torch.where(labelled, -beta * (s * logp + (1 - s) * log1mp), loss)
    return loss.mean()


@register_loss("em")
class EntropyMaximization(nn.Module):
    """EM: -log p on positives, α × negative binary entropy on unknown entries (α per data set, see recipes)."""

    paper = "Zhou et al., Acknowledging the Unknown for Multi-label Learning with Single Positive Labels, ECCV 2022"
    labels = "single positive"

    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        require_unknown("em", targets)
        return em_loss(logits, targets, self.alpha)


def apl_quotas(observed: torch.Tensor, neg_proportion: float, num_epochs: int, warmup_epochs: int) -> torch.Tensor:
    """Per-class number of pseudo-labels made at each update (K,), as their ``int(...)`` truncation computes it."""
    unknown_per_class = (observed == -1).sum(dim=0).tolist()
    updates = num_epochs - warmup_epochs
    return torch.tensor([int(neg_proportion * u / updates) for u in unknown_per_class], dtype=torch.long)


@register_loss("em_apl")
class EntropyMaximizationAPL(EpochLoss):
    """EM + APL: EM plus soft negative pseudo-labels made after each epoch from warm-up on (module docstring).

    Called with ``indices``. Hooks: ``wants_predictions(epoch)``, then ``end_epoch(epoch, probs)``
    with the training set's probabilities (N, K) in dataset order. State (in ``state_dict``):
    ``pseudo_labels`` (N, K) float (s or NaN; call ``.double()`` on the module for float64 state),
    ``unknown`` (N, K) bool and ``quota`` (K,).

    Args:
        num_images: N, training-set size.
        num_classes: K.
        alpha, beta: weights of the entropy and pseudo-label terms (COCO 0.1 / 0.9).
        warmup_epochs: first (1-based) epoch after which pseudo-labels are made (COCO 5).
        num_epochs: epochs of the run (10).
        neg_proportion: fraction of each class's unknown entries pseudo-labelled over the run (0.9).
        observed: (N, K) int8 training targets in {1, 0, -1}.
    """

    paper = "Zhou et al., Acknowledging the Unknown for Multi-label Learning with Single Positive Labels, ECCV 2022"
    labels = "single positive"

    def __init__(self, num_images: int, num_classes: int, alpha: float = 0.1, beta: float = 0.9,
                 warmup_epochs: int = 5, num_epochs: int = 10, neg_proportion: float = 0.9,
                 observed: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        if observed is None:
            raise LossInputError("em_apl needs observed=<the (N, K) int8 training targets> to count unknown entries")
        observed = torch.as_tensor(np.asarray(observed) if not isinstance(observed, torch.Tensor) else observed)
        if tuple(observed.shape) != (num_images, num_classes):
            raise LossInputError(f"em_apl observed labels have shape {tuple(observed.shape)}, expected "
                                 f"(num_images, num_classes) = ({num_images}, {num_classes})")
        require_unknown("em_apl", observed)
        if not 0 <= warmup_epochs < num_epochs:
            raise LossInputError(f"em_apl needs 0 <= warmup_epochs < num_epochs, got {warmup_epochs} and {num_epochs}")
        if not 0 < neg_proportion <= 1:
            raise LossInputError(f"em_apl neg_proportion is a fraction in (0, 1], got {neg_proportion}")
        self.alpha, self.beta, self.neg_proportion = alpha, beta, neg_proportion
        self.warmup_epochs, self.num_epochs = int(warmup_epochs), int(num_epochs)
        self.register_buffer("unknown", observed == -1)
        self.register_buffer("quota", apl_quotas(observed, neg_proportion, self.num_epochs, self.warmup_epochs))
        self.register_buffer("pseudo_labels", torch.full((num_images, num_classes), math.nan))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        indices = require_indices("em_apl", indices).to(self.pseudo_labels.device)
        if indices.shape != logits.shape[:1]:
            raise LossInputError(f"indices have shape {tuple(indices.shape)}, expected ({logits.shape[0]},)")
        require_unknown("em_apl", targets)
        return em_loss(logits, targets, self.alpha, self.pseudo_labels[indices], self.beta)

    def updates_after(self, epoch: int) -> bool:
        """Whether the official schedule makes pseudo-labels after 0-based ``epoch``."""
        return epoch + 1 >= self.warmup_epochs

    def wants_predictions(self, epoch: int) -> bool:
        """True after the epochs whose update a later epoch trains on (warm-up on, all but the last)."""
        return self.updates_after(epoch) and epoch + 1 < self.num_epochs

    @torch.no_grad()
    def end_epoch(self, epoch: int, probs: torch.Tensor) -> int:
        """Make this epoch's pseudo-labels from ``probs`` (N, K), all training rows in dataset order.

        Returns the number of new pseudo-labels (0 before the warm-up epoch).
        """
        probs = torch.as_tensor(probs).to(device=self.pseudo_labels.device)
        if probs.shape != self.pseudo_labels.shape:
            raise LossInputError(f"em_apl end_epoch takes the probabilities of all {self.pseudo_labels.shape[0]} "
                                 f"training rows in dataset order, (N, K) = {tuple(self.pseudo_labels.shape)}; got "
                                 f"{tuple(probs.shape)}")
        if not self.updates_after(epoch):
            return 0
        candidate = self.unknown & torch.isnan(self.pseudo_labels)
        ranked = torch.where(candidate, probs.to(torch.float64), math.inf)
        order = torch.sort(ranked, dim=0, stable=True).indices  # (N, K): rows by ascending probability
        take = torch.minimum(self.quota.to(candidate.device), candidate.sum(dim=0))
        chosen = torch.arange(order.shape[0], device=order.device)[:, None] < take[None, :]
        rows, cols = order[chosen], chosen.nonzero(as_tuple=True)[1]
        values = probs[rows, cols].to(self.pseudo_labels.dtype)
        # the official matrix stores -p; a p of exactly 0 becomes -0.0, which still reads as unlabelled
        self.pseudo_labels[rows, cols] = torch.where(values == 0, math.nan, values)
        return int(rows.numel())
