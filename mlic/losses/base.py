"""What every loss module shares: the checks of a batch's inputs and the base class of epoch-scheduled losses.

Loss modules import these from here, not from the package, so that ``mlic/losses/__init__.py`` only
imports its members (which register themselves in :data:`mlic.registry.LOSSES`) and no member imports
the package back.
"""

from __future__ import annotations

import torch
from torch import nn

from mlic.errors import MlicError


class LossInputError(MlicError):
    """Targets or indices a loss cannot use; the message says what to pass instead."""


def batch_inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as every loss reads it: logits (B, K) in float32 or float64 (half precision promoted), targets
    (B, K) on the logits' device; a shape mismatch is one clear error."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = targets.to(logits.device)
    if targets.shape != logits.shape:
        raise LossInputError(f"targets have shape {tuple(targets.shape)}, logits {tuple(logits.shape)}")
    return logits, targets


def require_indices(name: str, indices: torch.Tensor | None) -> torch.Tensor:
    """The batch's dataset rows as a long tensor, or a one-line error for a per-image loss called without them."""
    if indices is None:
        raise LossInputError(f"{name} keeps per-image state: call loss(logits, targets, indices) with the batch's "
                             "dataset row numbers")
    return torch.as_tensor(indices).long()


def require_unknown(name: str, targets: torch.Tensor) -> None:
    """One-line error for a partial-label loss handed a batch without any unknown (-1) target."""
    if not bool((targets == -1).any()):
        raise LossInputError(f"{name} is a partial-label loss but the targets hold no unknown (-1) entry: train "
                             "full labels with bce/asl, or pass the observed (partial) labels")


def _sync_epoch(module: nn.Module, incompatible_keys) -> None:
    module._epoch = int(module.epoch)


class EpochLoss(nn.Module):
    """Base of losses whose value depends on the epoch: ``start_epoch`` stores it, buffer ``epoch`` saves it.

    ``self._epoch`` mirrors the buffer as a Python int, so the forward pass never reads a device tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self._epoch = 0
        self.register_load_state_dict_post_hook(_sync_epoch)

    def start_epoch(self, epoch: int) -> None:
        """Set the epoch about to be trained, 0-based (= number of finished epochs)."""
        if int(epoch) < 0:
            raise LossInputError(f"start_epoch takes the 0-based epoch (epochs finished), got {epoch}")
        self._epoch = int(epoch)
        self.epoch.fill_(self._epoch)
