"""Full-label losses: BCE, focal, ASL. Unknown targets (-1) are ignored.

Each is a pure function on logits plus a thin ``nn.Module``. The value is the mean over the
known entries of the batch (``reduction="mean"``) or their sum (``"sum"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlic.registry import register_loss


def log_sigmoids(logits: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and log(1 - p) for p = sigmoid(logits).

    With ``eps=None`` both are exact (``logsigmoid``); with a float they are ``log(p + eps)`` and
    ``log(1 - p + eps)``, as Cole et al.'s code writes them.
    """
    if eps is None:
        return F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    return torch.log(p + eps), torch.log(1 - p + eps)


def as_float_targets(targets: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split encoded targets into float masks (positive, negative, known), in the logits' dtype."""
    targets = targets.to(logits.device)
    pos = (targets == 1).to(logits.dtype)
    neg = (targets == 0).to(logits.dtype)
    return pos, neg, pos + neg


def reduce_known(loss: torch.Tensor, known: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a loss matrix over its known entries."""
    if reduction == "none":
        return loss
    total = (loss * known).sum()
    if reduction == "sum":
        return total
    return total / known.sum().clamp(min=1)


def bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, eps: float | None = None, smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy on logits (B, K) with targets (B, K) in {1, 0, -1}.

    ``smoothing`` moves each known target towards the other side by that amount (Cole et al.'s
    bce_ls: positives 0.9·(-log p) + 0.1·(-log(1-p)), negatives mirrored).
    """
    pos, neg, known = as_float_targets(targets, logits)
    logp, log1mp = log_sigmoids(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, eps)
    soft = pos * (1 - smoothing) + neg * smoothing
    loss = -(soft * logp + (known - soft) * log1mp)
    return reduce_known(loss, known, reduction)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) on (B, K) logits; ``alpha`` weights positives, 1-alpha negatives."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    pos, neg, known = as_float_targets(targets, logits)
    p = torch.sigmoid(logits)
    ce = -(pos * F.logsigmoid(logits) + neg * F.logsigmoid(-logits))
    p_t = pos * p + neg * (1 - p)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (pos * alpha + neg * (1 - alpha))
    return reduce_known(loss, known, reduction)


def asl_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
    clip: float = 0.05, eps: float = 1e-8, focal_grad: bool = False, reduction: str = "mean",
) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) on (B, K) logits.

    Negatives use the probability shifted by ``clip`` (p_m = max(p - clip, 0)); log terms are
    clamped at ``eps``; the focusing weight (1 - p_t)^γ is computed without gradient unless
    ``focal_grad`` (as the official implementation's default). Query2Label trains with
    γ- = 2, γ+ = 0, clip 0, eps 1e-5 and multiplies the mean by 1000 (``scale`` in :class:`ASL`).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    pos, neg, known = as_float_targets(targets, logits)
    p = torch.sigmoid(logits)
    p_neg = 1 - p
    if clip > 0:
        p_neg = (p_neg + clip).clamp(max=1)
    loss = pos * torch.log(p.clamp(min=eps)) + neg * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.set_grad_enabled(focal_grad and torch.is_grad_enabled()):
            p_t = p * pos + p_neg * neg
            weight = (1 - p_t).pow(gamma_pos * pos + gamma_neg * neg)
        loss = loss * weight
    return reduce_known(-loss, known, reduction)


@register_loss("bce")
class BCE(nn.Module):
    """Binary cross-entropy; ``eps=None`` is exact, ``eps=1e-5`` matches Cole et al.'s ``-log(p + 1e-5)``."""

    paper = "binary cross-entropy (standard)"
    labels = "full"

    def __init__(self, eps: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.eps, self.reduction = eps, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return bce_loss(logits, targets, eps=self.eps, reduction=self.reduction)


@register_loss("bce_ls")
class BCELabelSmoothing(nn.Module):
    """BCE with label smoothing on full labels (Cole et al.'s bce_ls; their eps 1e-5 by default)."""

    paper = "Cole et al., Multi-Label Learning from Single Positive Labels, CVPR 2021 (full-label baseline)"
    labels = "full"

    def __init__(self, smoothing: float = 0.1, eps: float | None = 1e-5, reduction: str = "mean") -> None:
        super().__init__()
        self.smoothing, self.eps, self.reduction = smoothing, eps, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return bce_loss(logits, targets, eps=self.eps, smoothing=self.smoothing, reduction=self.reduction)


@register_loss("focal")
class Focal(nn.Module):
    """Sigmoid focal loss."""

    paper = "Lin et al., Focal Loss for Dense Object Detection, ICCV 2017"
    labels = "full"

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma, self.alpha, self.reduction = gamma, alpha, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma, self.alpha, self.reduction)


@register_loss("asl")
class ASL(nn.Module):
    """Asymmetric loss; ``scale`` multiplies the reduced value (Query2Label uses 1000 with the mean)."""

    paper = "Ridnik et al., Asymmetric Loss For Multi-Label Classification, ICCV 2021"
    labels = "full"

    def __init__(
        self, gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
        focal_grad: bool = False, scale: float = 1.0, reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.focal_grad, self.scale, self.reduction = focal_grad, scale, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        loss = asl_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.clip, self.eps, self.focal_grad,
                        self.reduction)
        return loss * self.scale if self.scale != 1.0 else loss
