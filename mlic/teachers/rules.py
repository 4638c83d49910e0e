"""Pseudo-label rules: a teacher's class similarities (and the observed labels) -> int8 pseudo-labels.

Pseudo-labels are 1 (pseudo-positive), -1 (pseudo-negative) or 0 (none), kept apart from the targets; a
loss applies them only where the target is unknown. Each rule reproduces its official code, decision by
decision (strict or not, truncations, the order of writes); the options that fix an official bug default to
the official behaviour.
"""

from __future__ import annotations

import torch

from mlic.errors import MlicError
from mlic.registry import registrar

RULES: dict[str, object] = {}
_rule = registrar(RULES, "pseudo-label rule")


def _sims(sims: torch.Tensor, ndim: int, rule: str) -> torch.Tensor:
    sims = torch.as_tensor(sims)
    if sims.ndim != ndim:
        shape = "(B, K)" if ndim == 2 else "(B, V, K) with view 0 the global view"
        raise MlicError(f"pseudo-label rule '{rule}' takes similarities {shape}, got {tuple(sims.shape)}")
    return sims if sims.is_floating_point() else sims.float()


@_rule("vlpl")
def vlpl_pseudo_labels(sims: torch.Tensor, observed: torch.Tensor | None = None, temperature: float = 0.01,
                       threshold: float = 0.3, partial: float = 0.0) -> torch.Tensor:
    """VLPL (Xing et al., CVPRW 2024): 1 where ``softmax(sims / temperature)`` over the classes is ``> threshold``
    (strict, in the sims' dtype); then the ``int(partial * K)`` lowest-softmax classes of each row become -1,
    written after the positives (official ``clip_vision`` path; ``partial=0`` is the published ``resnet50`` path,
    which makes no negatives).

    Args:
        sims: (B, K) cosine similarities.
        observed: (B, K) targets; accepted and not used (the official pseudo-labels ignore the labels).
        temperature, threshold, partial: official ``-t`` (0.01), ``-th`` (0.3), ``-p`` (0.0).

    Returns:
        (B, K) int8 in {1, 0, -1}.
    """
    sims = _sims(sims, 2, "vlpl")
    soft = torch.softmax(sims / temperature, dim=-1)
    labels = torch.where(soft > threshold, 1, 0).to(torch.int8)
    n = int(partial * sims.shape[1])
    if n > 0:
        idx = torch.topk(soft, n, dim=-1, largest=False).indices
        labels.scatter_(1, idx, -1)
    return labels


def official_label_vec(observed: torch.Tensor) -> torch.Tensor:
    """mlic targets 1 / -1 / 0 -> Cole's official 1 (positive) / 0 (unobserved) / -1 (observed negative)."""
    observed = torch.as_tensor(observed)
    return torch.where(observed == 1, 1.0, torch.where(observed == -1, 0.0, -1.0))


@_rule("aevlp")
def aevlp_pseudo_labels(sims: torch.Tensor, observed: torch.Tensor, temperature: float = 0.01, eta: float = 0.3,
                        top_k: int = 3, threshold: float = 0.5, negative_ratio: float = 0.3,
                        pseudo_negatives: bool = False, logit_scale: float | None = None) -> torch.Tensor:
    """AEVLP's DAMP rule (Tran et al., ICCV 2025; official ``utils.get_pseudo_labels``).

    With q = softmax(sims / temperature) per view, g the global view's, α / β / m the max / min / mean over
    the tiles: ``eta_b = min(max_k g·y, eta)`` (y the official label vector: 0 for a row without a positive);
    per class ``s = (g + (α if α > eta_b else β)) / 2``; the ``top_k`` largest s that are ``>= threshold`` become 1;
    then the ``int(negative_ratio · K)`` classes with the lowest ``(g + m) / 2`` are set to 0 (official: this
    erases pseudo-positives among them) or, with ``pseudo_negatives=True``, to -1 (the intended negatives).
    ``negative_ratio=0`` removes the step and the erasure.

    Args:
        sims: (B, V, K) cosines, view 0 the global view, views 1.. the tiles (any order).
        observed: (B, K) int8 mlic targets (1 / 0 / -1); only positives (and, through y, negatives) set eta_b.
        logit_scale: None (official: cosines / temperature) or a factor applied to sims first.

    Returns:
        (B, K) int8, not masked by the observed labels.
    """
    sims = _sims(sims, 3, "aevlp")
    if sims.shape[1] < 2:
        raise MlicError(f"pseudo-label rule 'aevlp' needs the global view and at least one tile, got {sims.shape[1]} "
                        "views")
    observed = torch.as_tensor(observed).to(sims.device)
    if tuple(observed.shape) != (sims.shape[0], sims.shape[2]):
        raise MlicError(f"observed labels have shape {tuple(observed.shape)}, expected (B, K) = "
                        f"({sims.shape[0]}, {sims.shape[2]})")
    if logit_scale is not None:
        sims = sims * logit_scale
    q = torch.softmax(sims / temperature, dim=-1)
    g, tiles = q[:, 0], q[:, 1:]
    alpha, beta, avg = tiles.max(dim=1).values, tiles.min(dim=1).values, tiles.mean(dim=1)
    label_vec = official_label_vec(observed).to(torch.float32)
    eta_b = torch.minimum((g * label_vec).max(dim=1).values, torch.tensor(eta, dtype=torch.float32))
    sim_ag = torch.where(alpha > eta_b[:, None], alpha, beta)
    sim_final = (g + sim_ag) / 2
    labels = torch.zeros(sims.shape[0], sims.shape[2], dtype=torch.int8, device=sims.device)
    k = min(int(top_k), sims.shape[2])
    values, idx = torch.topk(sim_final, k, dim=-1)
    labels.scatter_(1, idx, (values >= threshold).to(torch.int8))
    n = int(negative_ratio * sims.shape[2])
    if n > 0:
        low = torch.topk((g + avg) / 2, n, dim=-1, largest=False).indices
        labels.scatter_(1, low, -1 if pseudo_negatives else 0)
    return labels


def pseudo_labels(rule: str, sims: torch.Tensor, observed: torch.Tensor | None = None, **rule_args) -> torch.Tensor:
    """Pseudo-labels (B, K) int8 (1 / -1 / 0) of the rule ``rule`` ("vlpl" or "aevlp") from a teacher's ``sims``."""
    key = rule.lower().replace("-", "_")
    if key not in RULES:
        raise MlicError(f"unknown pseudo-label rule '{rule}'; choose one of: {', '.join(sorted(RULES))}")
    import inspect

    valid = [p for p in inspect.signature(RULES[key]).parameters if p not in ("sims", "observed")]
    unknown = sorted(set(rule_args) - set(valid))
    if unknown:
        raise MlicError(f"{', '.join(unknown)}: not a setting of pseudo-label rule '{key}'; valid keys: "
                        f"{', '.join(valid)}")
    return RULES[key](sims, observed, **rule_args)
