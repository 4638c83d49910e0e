"""The TResNet checkpoint filter: official InPlaceABN TResNet weights in timm's names and BatchNorm weights.

The Query2Label and ML-Decoder TResNet releases hold the authors' TResNet (``body.conv1.0.weight``,
``body.layer2.0.conv1.0.1.weight``, ``body.layer3.0.downsample.1.0.weight``, ...), trained with InPlaceABN,
which scales by |w| + eps. timm's ``tresnet.checkpoint_filter_fn`` maps exactly this layout onto timm's
TResNet (``convN.0.`` / ``convN.0.0.`` -> ``convN.conv.``, ``convN.1.`` / ``convN.0.1.`` -> ``convN.bn.``,
``downsample.i.0/1.`` -> ``downsample.i.conv/bn.``, every norm weight -> ``abs(w) + 1e-5``), so it is reused
as is; we add the ``num_batches_tracked`` counters that inplace_abn 1.0.x files lack, because our import
checks the key set strictly before loading (timm leaves them to ``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.models.tresnet import checkpoint_filter_fn as timm_tresnet_filter


def tresnet_checkpoint_filter(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert the official TResNet weights under ``prefix`` for timm's TResNet; other keys pass unchanged.

    Args:
        state: a state dict whose keys under ``prefix`` are an official TResNet's (``prefix + "body.conv1.0.weight"``).
        prefix: where the TResNet's own keys start (``"backbone.body."`` in our classifier).

    Returns:
        A new dict: the TResNet keys renamed by timm's ``checkpoint_filter_fn`` (norm weights ``abs(w) + 1e-5``
        in the file's dtype), a ``num_batches_tracked`` of 0 added where a norm has none, the rest as given.
    """
    body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    converted = timm_tresnet_filter(body, None)  # the model argument is unused for TResNet
    for key in [k for k in converted if k.endswith(".bn.running_var")]:
        converted.setdefault(key[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return {**{k: v for k, v in state.items() if not k.startswith(prefix)},
            **{prefix + k: v for k, v in converted.items()}}
