"""Large Loss Matters (Kim et al., CVPR 2022): LL-R, LL-Ct and LL-Cp, as the official code computes them.

Per batch, the loss is BCE-with-logits with every unknown (-1) entry taken as a negative (AN). From
the second epoch on, the unknown entries with the largest losses are modified: LL-R rejects them
(loss 0), LL-Ct corrects them for this step (target 1), LL-Cp corrects them and writes the
correction into the training labels for good. How many: ``k = ceil(B·K·(1 − clean_rate))`` (LL-R,
LL-Ct) or ``ceil(B·K·δ)`` (LL-Cp), with ``δ = delta_rel / 100`` and ``clean_rate`` starting at 1 and
lowered by δ after every finished epoch, by repeated float subtraction as theirs (which makes
``k`` one larger than the exact value in some epochs; reproduced). Every entry whose unknown-loss
ties the k-th largest is modified too, and the final value is the mean over all B·K entries.

Official quirks (LARGE_LOSS.md), with the option that changes each:

- LL-Cp's write-back keeps only losses strictly above the k-th largest (``writeback="strict"``,
  the LL repository): at most k − 1 labels per batch and none when k = 1 (e.g. VOC, batch 16,
  delta_rel 0.1). ``writeback="inclusive"`` writes every modified entry, as the authors' revised
  copy in the BoostLU repository does.
- The LL repository tests ``mod_scheme is 'LL-Cp'``, which is False as run from its command line,
  so its LL-Cp as shipped computes exactly LL-Ct and never writes a label: use ``ll_ct`` for that.
  ``ll_cp`` here is the scheme as intended (and as the BoostLU copy runs it).
- When k exceeds the number of unknown entries with a positive loss, the k-th largest is 0 and
  the official selection also takes every observed entry (LL-R zeroes them, LL-Ct/Cp flip their
  targets). Reproduced; unreachable with single positives at the published rates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlic.losses.base import EpochLoss, LossInputError, batch_inputs, require_indices, require_unknown
from mlic.registry import register_loss

SCHEMES = ("ll_r", "ll_ct", "ll_cp")
WRITEBACKS = ("strict", "inclusive")


def clean_rate(epoch: int, delta_rel: float) -> float:
    """Their ``clean_rate`` during 0-based ``epoch``: 1, then δ = delta_rel/100 subtracted once per finished epoch."""
    rate: float = 1  # an int until the first subtraction, as theirs: epoch 0 compares equal to 1
    delta = delta_rel / 100
    for _ in range(epoch):
        rate -= delta
    return rate


def modified_count(batch_size: int, num_classes: int, epoch: int, delta_rel: float, scheme: str) -> int:
    """k, the number of unknown entries to modify in a batch; 0 during the first epoch."""
    rate = clean_rate(epoch, delta_rel)
    if rate == 1:
        return 0
    entries = batch_size * num_classes
    if scheme == "ll_cp":
        return math.ceil(entries * (delta_rel / 100))
    return math.ceil(entries * (1 - rate))


def large_loss(
    logits: torch.Tensor, targets: torch.Tensor, k: int, scheme: str = "ll_r"
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The Large Loss objective on one batch.

    Args:
        logits: (B, K).
        targets: (B, K) int8 in {1, 0, -1}; -1 (unknown) is taken as negative.
        k: how many of the largest unknown-entry losses to modify (0: plain AN).
        scheme: "ll_r" (reject: loss 0) or "ll_ct" / "ll_cp" (correct: target 1).

    Returns:
        ``(loss, unknown_loss, threshold)``: the scalar mean over B·K entries; the detached
        unknown-entry losses u (B, K), 0 on observed entries; τ, the k-th largest of u (None when k = 0).
        The modified entries are ``u >= τ``.
    """
    if scheme not in SCHEMES:
        raise LossInputError(f"large-loss scheme must be one of {SCHEMES}, got {scheme!r}")
    logits, targets = batch_inputs(logits, targets)
    positive = (targets == 1).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, positive, reduction="none")
    if k == 0:
        return loss.mean(), None, None
    if k > loss.numel():
        raise LossInputError(f"{scheme} would modify {k} of {loss.numel()} entries: delta_rel × epochs exceeds 100%, "
                             "lower delta_rel or the number of epochs")
    unknown_loss = (targets == -1).to(logits.dtype) * loss.detach()
    threshold = torch.topk(unknown_loss.flatten(), k).values[-1]
    modified = unknown_loss >= threshold
    if scheme == "ll_r":
        final = torch.where(modified, torch.zeros_like(loss), loss)
    else:
        corrected = F.binary_cross_entropy_with_logits(logits, 1 - positive, reduction="none")
        final = torch.where(modified, corrected, loss)
    return final.mean(), unknown_loss, threshold


class LargeLoss(EpochLoss):
    """Shared module of LL-R / LL-Ct / LL-Cp; call ``start_epoch(epoch)`` before each epoch.

    Args:
        delta_rel: δ_rel, percent per epoch as their command line (0 < delta_rel ≤ 100; their grid
            0.1 … 0.5). The LL repository has no default; the defaults here are the values the authors
            fix in their BoostLU repository: LL-R 0.5, LL-Ct 0.2, LL-Cp 0.1.
    """

    paper = "Kim et al., Large Loss Matters in Weakly Supervised Multi-Label Classification, CVPR 2022"
    labels = "partial"
    scheme = "ll_r"

    def __init__(self, delta_rel: float = 0.5) -> None:
        super().__init__()
        if not 0 < float(delta_rel) <= 100:
            raise LossInputError(f"delta_rel is a percentage per epoch in (0, 100] (e.g. 0.5), got {delta_rel}")
        self.delta_rel = float(delta_rel)
        self.last_k, self.last_threshold = 0, None

    def batch_loss(self, logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:func:`large_loss` at this epoch's k; also kept as ``last_k`` and ``last_threshold``."""
        require_unknown(self.scheme, targets)
        b, k_classes = logits.shape
        self.last_k = modified_count(b, k_classes, self._epoch, self.delta_rel, self.scheme)
        value, unknown_loss, threshold = large_loss(logits, targets, self.last_k, self.scheme)
        self.last_threshold = threshold
        return value, unknown_loss, threshold

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.batch_loss(logits, targets)[0]


@register_loss("ll_r")
class LargeLossReject(LargeLoss):
    """LL-R: from the second epoch on, the largest unknown-entry losses are dropped (loss 0)."""

    scheme = "ll_r"


@register_loss("ll_ct")
class LargeLossCorrectTemporary(LargeLoss):
    """LL-Ct: from the second epoch on, the largest unknown-entry losses get target 1 for this step."""

    scheme = "ll_ct"

    def __init__(self, delta_rel: float = 0.2) -> None:
        super().__init__(delta_rel)


@register_loss("ll_cp")
class LargeLossCorrectPermanent(LargeLoss):
    """LL-Cp: LL-Ct's loss with k = ceil(B·K·δ), and the corrections written into the training labels.

    Call with ``indices``; after the optimiser step, ``apply_corrections(label_matrix)`` writes 1 at
    the last call's corrected (dataset row, class) entries. Which entries (see the module docstring):
    ``writeback="strict"`` (default, the LL repository: loss strictly above the k-th largest) or
    ``"inclusive"`` (the BoostLU repository: every corrected entry).
    """

    scheme = "ll_cp"

    def __init__(self, delta_rel: float = 0.1, writeback: str = "strict") -> None:
        super().__init__(delta_rel)
        if writeback not in WRITEBACKS:
            raise LossInputError(f"ll_cp writeback must be one of {WRITEBACKS}, got {writeback!r}")
        self.writeback = writeback
        self.correction_rows = torch.zeros(0, dtype=torch.long)
        self.correction_cols = torch.zeros(0, dtype=torch.long)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        indices = require_indices("ll_cp", indices)
        if indices.shape != logits.shape[:1]:
            raise LossInputError(f"indices have shape {tuple(indices.shape)}, expected ({logits.shape[0]},)")
        value, unknown_loss, threshold = self.batch_loss(logits, targets)
        if threshold is None:
            rows = cols = torch.zeros(0, dtype=torch.long, device=logits.device)
        else:
            written = unknown_loss > threshold if self.writeback == "strict" else unknown_loss >= threshold
            rows, cols = written.nonzero(as_tuple=True)
        self.correction_rows = indices.to(rows.device)[rows]
        self.correction_cols = cols
        return value

    @torch.no_grad()
    def apply_corrections(self, label_matrix: torch.Tensor) -> int:
        """Write 1 into ``label_matrix`` (N, K) int8 at the last call's corrections, in place; returns their count.

        The corrections are transient (one batch); the corrected matrix is the training labels'
        state, which the engine saves for resume.
        """
        rows = self.correction_rows.to(label_matrix.device)
        if rows.numel() and int(rows.max()) >= label_matrix.shape[0]:
            raise LossInputError(f"ll_cp corrections reach row {int(rows.max())}, the label matrix has "
                                 f"{label_matrix.shape[0]} rows: pass the whole training label matrix")
        label_matrix[rows, self.correction_cols.to(label_matrix.device)] = 1
        return int(rows.numel())
