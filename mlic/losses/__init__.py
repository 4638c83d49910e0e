"""Losses for multi-label classification, all called as ``loss(logits, targets, indices=None)``.

Targets use the one encoding of mlic: 1 positive, 0 negative, -1 unknown. Full-label losses
(``full.py``) ignore unknown entries; partial-label losses define what unknown means.

The loss protocol (what the engine may call; a loss has only the hooks it needs)::

    loss = build_loss(name, **kwargs)        # an nn.Module
    loss(logits, targets, indices=None)      # logits (B, K); targets (B, K) int8 {1, 0, -1};
                                             # indices (B,) = dataset rows of the batch, required by
                                             # losses that keep per-image state (role, ll_cp, em_apl)
    loss.start_epoch(epoch)                  # before each epoch; 0-based (= epochs finished):
                                             # ll_r, ll_ct, ll_cp, splc, gr, em_apl
    loss.wants_predictions(epoch) -> bool    # em_apl: after this epoch, wants the scores of the whole
    loss.end_epoch(epoch, probs)             #   training set: the engine runs a no-grad pass and hands
                                             #   over probs (N, K) in dataset order
    loss.pseudo_labels                       # em_apl: (N, K) float, soft target or NaN
    loss.apply_corrections(label_matrix)     # ll_cp: after the optimiser step, writes the last call's
                                             #   permanent corrections (1) into the (N, K) int8 training
                                             #   labels in place; the next epoch reads them
    loss.state_dict()                        # everything resume needs: the epoch of scheduled losses,
                                             #   ROLE's estimator, APL's pseudo-labels (buffers)

Every loss class also states ``paper`` (where it comes from) and ``labels`` ("full", "partial" or
"single positive": the labels it is meant for), for listings generated from the registry.
"""

from __future__ import annotations

from torch import nn

from mlic.errors import MlicError

# each module registers its losses in mlic.registry.LOSSES: full (bce, bce_ls, focal, asl), partial (an, an_ls, wan,
# epr, role), large_loss (ll_r, ll_ct, ll_cp), splc (hill, splc), em_apl (em, em_apl), gr (gr)
from mlic.losses import em_apl, full, gr, large_loss, partial, splc  # noqa: F401
from mlic.losses.base import (  # noqa: F401  (re-exported: the names every loss module shares)
    EpochLoss,
    LossInputError,
    batch_inputs,
    require_indices,
    require_unknown,
)
from mlic.registry import LOSSES, check_arguments, register_loss  # noqa: F401  (register_loss re-exported)


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered under ``name`` (e.g. "bce", "asl", "role") with its keyword arguments."""
    key = name.lower().replace("-", "_")
    if key not in LOSSES:
        raise MlicError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(LOSSES))}")
    check_arguments(LOSSES[key], kwargs, f"loss '{key}'", "--loss-arg")
    return LOSSES[key](**kwargs)


def build_loss_for_data(name: str, loss_args: dict, observed, epochs: int, seed: int = 0, clean=None) -> nn.Module:
    """The one builder the engine uses (both modes): what a loss takes from the data comes from the data.

    Fills, where the loss's constructor takes them and ``loss_args`` does not set them: ``num_images``,
    ``num_classes`` and ``observed`` (the (N, K) training labels: ROLE's and APL's initial state) from
    ``observed``; ``expected_positives`` (mean positives per image of the ``clean`` (N, K) labels: a data-set
    statistic, as Cole et al. use it; left to the loss's default without them); ``num_epochs`` (the run's
    epochs, for scheduled losses) and ``seed``.
    """
    import inspect

    import numpy as np

    key = name.lower().replace("-", "_")
    if key not in LOSSES:
        raise MlicError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(LOSSES))}")
    params = inspect.signature(LOSSES[key].__init__).parameters
    # only a loss that keeps per-image state reads the whole matrix: sparse labels stay sparse otherwise
    from_data = {"num_images": lambda: observed.shape[0], "num_classes": lambda: observed.shape[1],
                 "observed": lambda: np.asarray(observed), "num_epochs": lambda: epochs, "seed": lambda: seed}
    if clean is not None:
        from_data["expected_positives"] = lambda: _positives_per_image(clean)
    args = dict(loss_args)
    for field, value in from_data.items():
        if field in params and field not in args:
            args[field] = value()
    return build_loss(key, **args)


def _positives_per_image(targets) -> float:
    """Mean positives per image of (N, K) labels, dense or sparse (without densifying)."""
    import numpy as np

    from mlic.data.targets import is_sparse

    if is_sparse(targets):
        return float((np.asarray(targets.values) == 1).sum() / max(len(targets), 1))
    return float((np.asarray(targets) == 1).sum(1).mean())


from mlic.losses import teacher_pl  # noqa: E402,F401  (vlpl, aevlp: losses that need a teacher)
