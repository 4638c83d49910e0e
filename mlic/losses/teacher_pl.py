"""Losses trained with a teacher's pseudo-labels: VLPL (EM + pseudo-labels) and AEVLP (GPR).

Both read per-image pseudo-labels (1 pseudo-positive, -1 pseudo-negative, 0 none) that the engine hands over
with ``set_pseudo_labels(pl_all)`` ((N, K) int8, dataset order) before training (``teacher_cache=True``) or
before every step (``teacher_cache=False``, the official schedule); ``loss(logits, targets, indices)`` reads
``pl_all[indices]``. Pseudo-labels apply only where the target is unknown (-1). The matrix is a buffer, so it is
saved in the loss's ``state_dict`` (resume).

**VLPL** (Xing et al., CVPRW 2024; official ``losses.loss_EM_PL``), every log ``log(x + 1e-5)``, p = σ(logit),
mean over all B·K entries; from 0-based epoch ``warmup_epochs`` on:

- observed positive: ``−log(p + ε)``; observed negative (0, absent from the official data): ``−log(1 − p + ε)``
  (mlic's choice, as ``em``);
- unknown, no pseudo-label: ``α (p log(p + ε) + (1 − p) log(1 − p + ε))`` (EM);
- unknown, pseudo-positive: ``β+ (−0.9 log(p + ε) − 0.1 log(1 − p + ε))``;
- unknown, pseudo-negative: 0 (official: the negative term is commented out, the entry leaves training);
  ``train_pseudo_negatives=True`` applies ``β− (−0.1 log(p + ε) − 0.9 log(1 − p + ε))``.

Before ``warmup_epochs``: plain EM.

**AEVLP** (Tran et al., ICCV 2025; official ``losses.GPR_loss``), ε = 1e-7, the GR schedule of ``gr.py``, the
constants K = σ(w p̄ + b), V = exp(−½((p̄ − μ)/σ)²) of p̄ = p detached:

- observed positive: ``−log(p + ε)``;
- unknown, no pseudo-label: GR's ``V (K (1 − p^q2)/q2 + (1 − K)(1 − (1 − p)^q3)/q3)``;
- unknown, pseudo-positive: ``(1 − Vc)(ρ (−log(p + ε)) + (1 − ρ)(−log(1 − p + ε)))``, Vc = V clipped to
  [1 − λ1, 1 − λ2];
- unknown with pseudo-label -1, and observed negatives: ``V (−log(1 − p + ε))`` (official);
- value: mean over B·K + ``reg · (mean_b Σ_k p − expected_positives)² / K²``.

``use_pl=False`` is the official ablation (GR + reg·EPR, pseudo-labels ignored, observed negatives 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mlic.losses.base import EpochLoss, LossInputError, require_indices, require_unknown
from mlic.losses.gr import GRSchedule, gr_weights
from mlic.registry import register_loss

VLPL_EPSILON = 1e-5
AEVLP_EPSILON = 1e-7


class PseudoLabelLoss(EpochLoss):
    """Base of the teacher losses: the (N, K) int8 pseudo-label buffer, ``set_pseudo_labels`` and its lookup."""

    needs_teacher = True
    rule = ""

    def __init__(self, num_images: int | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        shape = (int(num_images), int(num_classes)) if num_images is not None and num_classes is not None else (0, 0)
        self.register_buffer("pseudo_labels", torch.zeros(shape, dtype=torch.int8))
        self._has_pseudo_labels = False

    def set_pseudo_labels(self, pl: torch.Tensor) -> None:
        """Hand over the pseudo-labels of the whole training set, (N, K) int8 in {1, 0, -1}, dataset order."""
        pl = torch.as_tensor(pl)
        if pl.ndim != 2:
            raise LossInputError(f"{self.rule} set_pseudo_labels takes (N, K) int8 pseudo-labels, got "
                                 f"{tuple(pl.shape)}")
        if pl.is_floating_point() or not bool(((pl >= -1) & (pl <= 1)).all()):
            raise LossInputError(f"{self.rule} pseudo-labels must be int8 in {{1, 0, -1}}")
        self.pseudo_labels = pl.to(device=self.pseudo_labels.device, dtype=torch.int8).clone()
        self._has_pseudo_labels = True

    def update_pseudo_labels(self, indices: torch.Tensor, pl: torch.Tensor) -> None:
        """Replace the rows ``indices`` (B,) of the held pseudo-labels with ``pl`` (B, K) (the per-step schedule)."""
        if not self._has_pseudo_labels:
            raise LossInputError(f"{self.rule}: call set_pseudo_labels(pl_all) once before updating rows")
        self.pseudo_labels[torch.as_tensor(indices).long().to(self.pseudo_labels.device)] = \
            torch.as_tensor(pl).to(self.pseudo_labels.device, torch.int8)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "pseudo_labels")
        if saved is not None and saved.shape != self.pseudo_labels.shape:
            self.pseudo_labels = torch.zeros_like(saved, device=self.pseudo_labels.device)
        if saved is not None:
            self._has_pseudo_labels = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def batch_pseudo_labels(self, logits: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        """The batch's pseudo-labels (B, K) int8 on the logits' device."""
        if not self._has_pseudo_labels:
            raise LossInputError(f"loss '{self.rule}' needs pseudo-labels from a teacher: add --teacher <CLIP weights> "
                                 "(or train on data made by mlic pseudo-label); in Python call "
                                 "loss.set_pseudo_labels(pl_all) first")
        idx = require_indices(self.rule, indices).to(self.pseudo_labels.device)
        if idx.shape != logits.shape[:1]:
            raise LossInputError(f"indices have shape {tuple(idx.shape)}, expected ({logits.shape[0]},)")
        if self.pseudo_labels.shape[1] != logits.shape[1]:
            raise LossInputError(f"pseudo-labels have {self.pseudo_labels.shape[1]} classes, logits {logits.shape[1]}")
        if idx.numel() and (int(idx.max()) >= self.pseudo_labels.shape[0] or int(idx.min()) < 0):
            raise LossInputError(f"indices reach row {int(idx.max())} but pseudo-labels hold "
                                 f"{self.pseudo_labels.shape[0]} rows")
        return self.pseudo_labels[idx].to(logits.device)


def _inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = targets.to(logits.device)
    if targets.shape != logits.shape:
        raise LossInputError(f"targets have shape {tuple(targets.shape)}, logits {tuple(logits.shape)}")
    return logits, targets


def vlpl_loss(logits: torch.Tensor, targets: torch.Tensor, pseudo: torch.Tensor | None, alpha: float = 0.1,
              beta_pos: float = 0.7, beta_neg: float = 0.0, train_pseudo_negatives: bool = False,
              eps: float = VLPL_EPSILON) -> torch.Tensor:
    """VLPL's EM_PL on one batch (module docstring); ``pseudo=None`` is the EM warm-up. A scalar.

    Args:
        logits: (B, K). targets: (B, K) int8 {1, 0, -1}. pseudo: (B, K) int8 {1, 0, -1} or None.
    """
    logits, targets = _inputs(logits, targets)
    p = torch.sigmoid(logits)
    logp, log1mp = torch.log(p + eps), torch.log(1 - p + eps)
    unknown = targets == -1
    loss = torch.where(targets == 1, -logp, -log1mp)
    loss = torch.where(unknown, alpha * (p * logp + (1 - p) * log1mp), loss)
    if pseudo is not None:
        pseudo = pseudo.to(logits.device)
        loss = torch.where(unknown & (pseudo == 1), beta_pos * (-0.9 * logp - 0.1 * log1mp), loss)
        negative = beta_neg * (-0.1 * logp - 0.9 * log1mp) if train_pseudo_negatives else torch.zeros_like(loss)
        loss = torch.where(unknown & (pseudo == -1), negative, loss)
    return (loss / loss.numel()).sum()


@register_loss("vlpl")
class VLPLLoss(PseudoLabelLoss):
    """VLPL's EM + pseudo-labels loss; needs a teacher's pseudo-labels (rule "vlpl").

    Args:
        alpha: EM weight on unknown entries without a pseudo-label (COCO/NUS 0.1, VOC 0.2, CUB 0.01).
        beta_pos: weight of the smoothed BCE on pseudo-positives (0.7).
        warmup_epochs: pure-EM epochs first (official ``warmup_epoch``; 0 in every published setting).
        beta_neg: weight on pseudo-negatives, only with ``train_pseudo_negatives`` (official 0.0).
        train_pseudo_negatives: False (official: pseudo-negative entries get 0) or True (the intended negative term).
        num_images, num_classes: size of the pseudo-label buffer (filled by the engine; else from set_pseudo_labels).
    """

    paper = "Xing et al., Vision-Language Pseudo-Labels for Single-Positive Multi-Label Learning, CVPR Workshops 2024"
    labels = "single positive"
    teacher = "CLIP ViT-L/14-336 (frozen), rule vlpl"
    rule = "vlpl"

    def __init__(self, alpha: float = 0.1, beta_pos: float = 0.7, warmup_epochs: int = 0, beta_neg: float = 0.0,
                 train_pseudo_negatives: bool = False, num_images: int | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__(num_images, num_classes)
        if warmup_epochs < 0:
            raise LossInputError(f"vlpl warmup_epochs must be >= 0, got {warmup_epochs}")
        self.alpha, self.beta_pos, self.beta_neg = float(alpha), float(beta_pos), float(beta_neg)
        self.warmup_epochs, self.train_pseudo_negatives = int(warmup_epochs), bool(train_pseudo_negatives)

    def uses_pseudo_labels(self) -> bool:
        """Whether the current epoch trains on pseudo-labels (0-based epoch >= warmup_epochs)."""
        return self._epoch >= self.warmup_epochs

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        require_unknown("vlpl", targets)
        pseudo = self.batch_pseudo_labels(logits, indices) if self.uses_pseudo_labels() else None
        return vlpl_loss(logits, targets, pseudo, self.alpha, self.beta_pos, self.beta_neg,
                         self.train_pseudo_negatives)


def gpr_loss(logits: torch.Tensor, targets: torch.Tensor, pseudo: torch.Tensor, w: float, b: float, mu: float,
             sigma: float, q2: float = 0.01, q3: float = 1.0, lam: Sequence[float] = (0.7, 0.5), rho: float = 0.9,
             reg: float = 0.001, expected_positives: float = 2.9, use_pl: bool = True,
             eps: float = AEVLP_EPSILON) -> torch.Tensor:
    """AEVLP's GPR loss on one batch at schedule values (w, b, μ, σ) (module docstring). A scalar.

    Args:
        logits: (B, K). targets: (B, K) int8 {1, 0, -1}. pseudo: (B, K) int8 {1, 0, -1}.
    """
    logits, targets = _inputs(logits, targets)
    p = torch.sigmoid(logits)
    k, v = gr_weights(p.detach(), w, b, mu, sigma)
    unknown = targets == -1
    logp, log1mp = torch.log(p + eps), torch.log(1 - p + eps)
    zero = torch.zeros_like(p)
    loss = torch.where(targets == 1, -logp, zero)
    gr_term = v * (k * (1 - p.pow(q2)) / q2 + (1 - k) * (1 - (1 - p).pow(q3)) / q3)
    if not use_pl:
        loss = torch.where(unknown, gr_term, loss)
    else:
        pseudo = pseudo.to(logits.device)
        loss = torch.where(unknown & (pseudo == 0), gr_term, loss)
        lam1, lam2 = float(lam[0]), float(lam[1])
        vc = torch.where(v > 1 - lam1, v, torch.full_like(v, 1 - lam1))
        vc = torch.where(vc < 1 - lam2, vc, torch.full_like(v, 1 - lam2))
        loss = torch.where(unknown & (pseudo == 1), (1 - vc) * (rho * -logp + (1 - rho) * -log1mp), loss)
        negative = (targets == 0) | (unknown & (pseudo == -1))
        loss = torch.where(negative, v * -log1mp, loss)
    epr = (p.sum(dim=1).mean() - expected_positives) ** 2 / logits.shape[1] ** 2
    return loss.mean() + reg * epr


@register_loss("aevlp")
class AEVLPLoss(GRSchedule, PseudoLabelLoss):
    """AEVLP's GPR loss (GR + pseudo-positives + EPR); needs a teacher's pseudo-labels (rule "aevlp").

    Args:
        num_epochs, linear_init, beta, alpha, q, schedule: GR's schedule and exponents (``gr``).
        lam: [λ1, λ2]: the pseudo-positive weight 1 − V is clipped to [λ2, λ1] (COCO [0.7, 0.5]).
        rho: positive share of the pseudo-positive term (0.9).
        reg: EPR weight (COCO/NUS 0.001, VOC 0.05, CUB 0.01).
        expected_positives: EPR's expected positives per image (official COCO 2.9, VOC 1.5, NUS 1.9, CUB 31.4).
        use_pl: False is the official ablation (pseudo-labels ignored; observed negatives 0).
        num_images, num_classes: size of the pseudo-label buffer (filled by the engine).
    """

    paper = ("Tran et al., More Reliable Pseudo-labels, Better Performance: A Generalized Approach to Single Positive "
             "Multi-label Learning, ICCV 2025")
    labels = "single positive"
    teacher = "CLIP ViT-B/16 (frozen) + GCN text adapter, rule aevlp"
    rule = "aevlp"

    def __init__(self, num_epochs: int = 8, linear_init: int = 0, beta: Sequence[float] = (0.0, 10.0, -2.0, -8.0),
                 alpha: Sequence[float] = (0.5, 2.0, 0.8, 0.5), q: Sequence[float] = (0.01, 1.0),
                 lam: Sequence[float] = (0.7, 0.5), rho: float = 0.9, reg: float = 0.001,
                 expected_positives: float = 2.9, use_pl: bool = True, schedule: str = "official",
                 num_images: int | None = None, num_classes: int | None = None) -> None:
        super().__init__(num_images, num_classes)
        if len(beta) != 4 or len(alpha) != 4 or len(q) != 2 or len(lam) != 2:
            raise LossInputError(f"aevlp takes beta=[w0, wT, b0, bT], alpha=[mu0, sigma0, muT, sigmaT], q=[q2, q3], "
                                 f"lam=[lambda1, lambda2]; got {len(beta)}, {len(alpha)}, {len(q)} and {len(lam)} "
                                 "values")
        self.init_schedule("aevlp", num_epochs, linear_init, beta, alpha, q, schedule)
        self.lam, self.rho, self.reg = (float(lam[0]), float(lam[1])), float(rho), float(reg)
        self.expected_positives, self.use_pl = float(expected_positives), bool(use_pl)
        self.needs_teacher = self.use_pl

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        require_unknown("aevlp", targets)
        pseudo = self.batch_pseudo_labels(logits, indices) if self.use_pl else None
        w, b, mu, sigma = self.schedule_values()
        return gpr_loss(logits, targets, pseudo, w, b, mu, sigma, self.q2, self.q3, self.lam, self.rho, self.reg,
                        self.expected_positives, self.use_pl)
