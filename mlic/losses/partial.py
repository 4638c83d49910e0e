"""Single-positive / partial-label losses of Cole et al. 2021: AN, AN-LS, WAN, EPR, ROLE.

Targets use mlic's encoding: 1 observed positive, 0 observed negative, -1 unknown. The official
code (elijahcole/single-positive-multi-label) accepts no observed negatives in these losses; here
an observed negative is treated as a certain negative (``-log(1-p)``, and ``-log(1-q)`` for the
ROLE estimator), which is the natural extension and leaves single-positive data unchanged.

Every log term is ``log(x + eps)`` with ``eps=1e-5`` by default, as the official code writes it
(``eps=None`` gives exact ``logsigmoid`` terms). The batch objective is the official one: the sum
of the loss matrix divided by ``B * K`` (all entries, observed or not), plus the regulariser added
once.

A consequence of the official eps worth knowing: ``d/dz -log(p + eps) = -p(1-p)/(p + eps)``
vanishes once p ≪ eps, so a positive whose logit has fallen below about -11.5 stops being pulled
back; a learning rate large enough to push all logits there in the first Adam steps stalls
training at chance (see ``mlic.config.TrainConfig.linear_defaults``). ``eps=None`` has no such trap.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mlic.errors import MlicError
from mlic.losses.full import log_sigmoids
from mlic.registry import register_loss

REDUCTIONS = ("mean", "none")


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _masks(targets: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float masks (positive, observed negative, unknown), shaped and typed like ``like``."""
    targets = targets.to(like.device)
    if targets.shape != like.shape:
        raise MlicError(f"targets have shape {tuple(targets.shape)}, logits {tuple(like.shape)}")
    return (targets == 1).to(like.dtype), (targets == 0).to(like.dtype), (targets == -1).to(like.dtype)


def _reduce(loss_matrix: torch.Tensor, reg: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Official batch objective: Σ loss / (B·K) + regulariser; ``"none"`` returns the matrix alone."""
    if reduction == "none":
        return loss_matrix
    if reduction != "mean":
        raise MlicError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    total = loss_matrix.sum() / loss_matrix.numel()
    return total if reg is None else total + reg


def _log_terms(logits: torch.Tensor, probs: torch.Tensor, eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and log(1 - p) as :func:`mlic.losses.full.log_sigmoids`, reusing p = sigmoid(logits)."""
    if eps is None:
        return log_sigmoids(logits, None)
    return torch.log(probs + eps), torch.log(1 - probs + eps)


def logit(p: float) -> float:
    """Inverse sigmoid, with p clamped to [1e-5, 1 - 1e-5] as the official estimator init does."""
    p = min(max(p, 1e-5), 1 - 1e-5)
    return math.log(p / (1 - p))


def expected_positive_penalty(probs: torch.Tensor, expected_positives: float, num_classes: int | None = None
                              ) -> torch.Tensor:
    """EPR regulariser ``(mean_n Σ_j p_nj − k)² / K²`` on probabilities (B, K); a scalar."""
    k = probs.shape[1] if num_classes is None else num_classes
    return (probs.sum(dim=1).mean() - expected_positives) ** 2 / k**2


def assume_negative_loss(
    logits: torch.Tensor, targets: torch.Tensor, eps: float | None = 1e-5, smoothing: float = 0.0,
    unknown_weight: float = 1.0, reduction: str = "mean",
) -> torch.Tensor:
    """"Assume negative": unknown labels are taken as negatives (AN, AN-LS, WAN).

    Args:
        logits: (B, K).
        targets: (B, K) in {1, 0, -1}.
        eps: log terms are ``log(x + eps)``; None for exact ones.
        smoothing: label smoothing on positives and (assumed) negatives alike (AN-LS: 0.1).
        unknown_weight: factor on the terms of unknown entries (WAN: 1 / (K - 1)).
        reduction: "mean" (Σ / (B·K), the official objective) or "none" ((B, K) matrix).

    Returns:
        Scalar, or (B, K) with ``reduction="none"``.
    """
    logits = _float_logits(logits)
    pos, neg, unknown = _masks(targets, logits)
    logp, log1mp = log_sigmoids(logits, eps)
    positive_term = -((1 - smoothing) * logp + smoothing * log1mp)
    negative_term = -((1 - smoothing) * log1mp + smoothing * logp)
    weight = neg + unknown_weight * unknown if unknown_weight != 1.0 else neg + unknown
    return _reduce(pos * positive_term + weight * negative_term, None, reduction)


def epr_loss(
    logits: torch.Tensor, targets: torch.Tensor, expected_positives: float, eps: float | None = 1e-5,
    num_classes: int | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """Expected positive regularisation: BCE on observed labels + ``(Σ_j p − k)² / K²`` over the batch.

    Args:
        logits: (B, K).
        targets: (B, K) in {1, 0, -1}; unknown entries contribute only through the regulariser.
        expected_positives: k, the expected number of positives per image (COCO 2.9).
        eps: log epsilon (None: exact).
        num_classes: K of the regulariser's normalisation (default: logits' K).
        reduction: "mean" or "none" (matrix without the regulariser).
    """
    logits = _float_logits(logits)
    pos, neg, _ = _masks(targets, logits)
    p = torch.sigmoid(logits)
    logp, log1mp = _log_terms(logits, p, eps)
    loss_matrix = -(pos * logp + neg * log1mp)
    reg = expected_positive_penalty(p, expected_positives, num_classes)
    return _reduce(loss_matrix, reg, reduction)


def role_loss(
    logits: torch.Tensor, estimator_logits: torch.Tensor, targets: torch.Tensor, expected_positives: float,
    eps: float | None = 1e-5, num_classes: int | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """Regularised online label estimation (ROLE), the classifier and the estimator trained jointly.

    With p = sigmoid(logits), q = sigmoid(estimator_logits) and a bar for stop-gradient::

        loss = ½[ℓ(p; y_obs) + ℓ(q; y_obs)] + ½[q̄·(-log p) + (1-q̄)·(-log(1-p)) + p̄·(-log q) + (1-p̄)·(-log(1-q))]
        reg  = ½[(mean Σ_j p − k)² + (mean Σ_j q − k)²] / K²

    where ℓ is -log on observed positives (-log(1-·) on observed negatives) and 0 on unknowns.

    Args:
        logits: (B, K) classifier logits.
        estimator_logits: (B, K) label-estimator logits of the same images (rows ``indices``).
        targets: (B, K) in {1, 0, -1}.
        expected_positives: k (COCO 2.9).
        eps: log epsilon (None: exact).
        num_classes: K of the regulariser's normalisation (default: logits' K).
        reduction: "mean" or "none" (matrix without the regulariser).
    """
    logits = _float_logits(logits)
    estimator_logits = estimator_logits.to(logits.dtype)
    pos, neg, _ = _masks(targets, logits)
    p, q = torch.sigmoid(logits), torch.sigmoid(estimator_logits)
    logp, log1mp = _log_terms(logits, p, eps)
    logq, log1mq = _log_terms(estimator_logits, q, eps)
    p_bar, q_bar = p.detach(), q.detach()
    observed_p = -(pos * logp + neg * log1mp)
    observed_q = -(pos * logq + neg * log1mq)
    cross_p = -(q_bar * logp + (1 - q_bar) * log1mp)
    cross_q = -(p_bar * logq + (1 - p_bar) * log1mq)
    loss_matrix = 0.5 * (observed_p + observed_q) + 0.5 * (cross_p + cross_q)
    reg = 0.5 * (expected_positive_penalty(p, expected_positives, num_classes)
                 + expected_positive_penalty(q, expected_positives, num_classes))
    return _reduce(loss_matrix, reg, reduction)


def _check_num_classes(expected: int | None, logits: torch.Tensor) -> None:
    if expected is not None and logits.shape[-1] != expected:
        raise MlicError(f"loss built for {expected} classes, logits have {logits.shape[-1]}")


@register_loss("an")
class AssumeNegative(nn.Module):
    """AN: -log p on observed positives, -log(1-p) on everything else."""

    paper = "Cole et al., Multi-Label Learning from Single Positive Labels, CVPR 2021"
    labels = "partial"

    def __init__(self, eps: float | None = 1e-5, reduction: str = "mean") -> None:
        super().__init__()
        self.eps, self.reduction = eps, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return assume_negative_loss(logits, targets, eps=self.eps, reduction=self.reduction)


@register_loss("an_ls")
class AssumeNegativeLabelSmoothing(nn.Module):
    """AN-LS: AN with label smoothing ``smoothing`` on positives and assumed negatives."""

    paper = "Cole et al., Multi-Label Learning from Single Positive Labels, CVPR 2021"
    labels = "partial"

    def __init__(self, smoothing: float = 0.1, eps: float | None = 1e-5, reduction: str = "mean") -> None:
        super().__init__()
        self.smoothing, self.eps, self.reduction = smoothing, eps, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return assume_negative_loss(logits, targets, eps=self.eps, smoothing=self.smoothing, reduction=self.reduction)


@register_loss("wan")
class WeakAssumeNegative(nn.Module):
    """WAN: AN with the terms of unknown entries divided by K - 1 (``num_classes`` default: the logits' K)."""

    paper = "Cole et al., Multi-Label Learning from Single Positive Labels, CVPR 2021"
    labels = "partial"

    def __init__(self, num_classes: int | None = None, eps: float | None = 1e-5, reduction: str = "mean") -> None:
        super().__init__()
        self.num_classes, self.eps, self.reduction = num_classes, eps, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        _check_num_classes(self.num_classes, logits)
        k = logits.shape[-1]
        return assume_negative_loss(logits, targets, eps=self.eps, unknown_weight=1.0 / (k - 1),
                                    reduction=self.reduction)


@register_loss("epr")
class ExpectedPositiveRegularization(nn.Module):
    """EPR: BCE on observed labels plus the batch-level expected-positive regulariser.

    Args:
        num_classes: K (checked against the logits; default: the logits' K).
        expected_positives: expected positives per image (COCO 2.9, VOC 1.5, NUS 1.9, CUB 31.4).
        eps: log epsilon (None: exact).
    """

    paper = "Cole et al., Multi-Label Learning from Single Positive Labels, CVPR 2021"
    labels = "single positive"

    def __init__(self, num_classes: int | None = None, expected_positives: float = 2.9, eps: float | None = 1e-5,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.num_classes, self.expected_positives, self.eps, self.reduction = (
            num_classes, expected_positives, eps, reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        _check_num_classes(self.num_classes, logits)
        return epr_loss(logits, targets, self.expected_positives, eps=self.eps, reduction=self.reduction)


class LabelEstimator(nn.Module):
    """One learnable logit per (training image, class): ``logits`` is an (N, K) parameter.

    Initialised as the official code does: observed positives at logit(0.995), observed negatives
    at logit(0.005), unknown entries uniform in ±logit(0.6) (drawn as ``(2·rand − 1)·logit(0.6)``
    from a torch generator seeded with ``seed``, in float32).
    """

    def __init__(self, num_images: int, num_classes: int, init_positive: float = 0.995,
                 init_negative: float = 0.005, init_unknown: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        if num_images < 1 or num_classes < 1:
            raise MlicError(f"label estimator needs num_images ≥ 1 and num_classes ≥ 1, got {num_images}, "
                             f"{num_classes}")
        self.init_positive, self.init_negative, self.init_unknown = init_positive, init_negative, init_unknown
        self.logits = nn.Parameter(torch.zeros(num_images, num_classes))
        self.init_from_targets(None, seed)

    @torch.no_grad()
    def init_from_targets(self, observed: np.ndarray | torch.Tensor | None, seed: int = 0) -> None:
        """Re-initialise from observed labels (N, K) in {1, 0, -1} (None: every entry unknown)."""
        generator = torch.Generator().manual_seed(int(seed))
        n, k = self.logits.shape
        values = (2 * torch.rand(n, k, generator=generator) - 1) * logit(self.init_unknown)
        if observed is not None:
            observed = torch.as_tensor(np.asarray(observed) if not isinstance(observed, torch.Tensor) else observed)
            if tuple(observed.shape) != (n, k):
                raise MlicError(f"observed labels have shape {tuple(observed.shape)}, the estimator {(n, k)}")
            values[observed == 1] = logit(self.init_positive)
            values[observed == 0] = logit(self.init_negative)
        self.logits.copy_(values.to(self.logits.dtype))


@register_loss("role")
class ROLE(nn.Module):
    """ROLE: classifier and a per-image label estimator (``self.estimator``) trained jointly.

    The estimator's (N, K) logits are a parameter of this module; put them in the optimiser with
    their own learning rate (official: 10× the classifier's). Called with ``indices`` (B,), the
    dataset rows of the batch.

    Args:
        num_images: N, training-set size.
        num_classes: K.
        expected_positives: k (COCO 2.9).
        eps: log epsilon (None: exact).
        observed: optional (N, K) observed labels to initialise the estimator from (the engine passes the
            training labels); without them every entry starts as unknown.
        seed: seed of the estimator's random init.
        init_positive, init_negative, init_unknown: init probabilities (official 0.995, 0.005, 0.6).
    """

    paper = "Cole et al., Multi-Label Learning from Single Positive Labels, CVPR 2021"
    labels = "single positive"

    def __init__(self, num_images: int, num_classes: int, expected_positives: float = 2.9,
                 eps: float | None = 1e-5, observed: np.ndarray | torch.Tensor | None = None, seed: int = 0,
                 init_positive: float = 0.995, init_negative: float = 0.005, init_unknown: float = 0.6,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.num_classes, self.expected_positives, self.eps, self.reduction = (
            num_classes, expected_positives, eps, reduction)
        self.estimator = LabelEstimator(num_images, num_classes, init_positive, init_negative, init_unknown, seed)
        if observed is not None:
            self.estimator.init_from_targets(observed, seed)

    def forward_rows(self, logits: torch.Tensor, estimator_logits: torch.Tensor, targets: torch.Tensor
                     ) -> torch.Tensor:
        """The loss given the batch's estimator logits (B, K) directly (for row-wise optimisers)."""
        _check_num_classes(self.num_classes, logits)
        return role_loss(logits, estimator_logits, targets, self.expected_positives, eps=self.eps,
                         num_classes=self.num_classes, reduction=self.reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        num_images = self.estimator.logits.shape[0]
        if indices is None:
            if logits.shape[0] != num_images:
                raise MlicError("role needs the batch's dataset row numbers: call loss(logits, targets, indices)")
            estimator_logits = self.estimator.logits
        else:
            indices = torch.as_tensor(indices, device=self.estimator.logits.device).long()
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_images):
                raise MlicError(f"indices must lie in [0, {num_images}) (the estimator's training-set size)")
            estimator_logits = self.estimator.logits[indices]
        return self.forward_rows(logits, estimator_logits, targets)
