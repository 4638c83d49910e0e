"""Resume state: everything that moves in a run, so that ``--resume`` continues the very same run.

``last.pt`` holds the weights, optimiser, schedule, scaler, EMA, loss state, training labels, every random
stream (torch, NumPy, Python), the position in the epoch, the history and a fingerprint of the settings and
data. It is a torch file of tensors and plain containers, written atomically and read with
``weights_only=True``: nothing a user was handed gets unpickled.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from mlic.data.labelset import LabelSet
from mlic.data.targets import is_sparse
from mlic.engine.checkpoint import CheckpointError
from mlic.io import UnsafeFileError, atomic_write_bytes, load_torch_weights


def rng_state() -> dict:
    """Every global random stream (torch, NumPy, Python) as tensors and plain containers."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_state(path: str | Path, state: dict) -> None:
    """Write resume state (tensors and plain containers) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: str | Path) -> dict:
    """Read resume state written by :func:`save_state`, refusing anything but tensors and containers."""
    try:
        return load_torch_weights(path)
    except UnsafeFileError as e:
        raise CheckpointError(f"{e}; delete it to start the run over") from None


def labelset_fingerprint(labelset: LabelSet) -> str:
    """A short hash of a LabelSet's classes, image paths and training targets: "same data" for resume."""
    import hashlib

    h = hashlib.sha1()
    h.update(json.dumps([labelset.classes, labelset.image_paths]).encode())
    targets = labelset.train_targets
    for part in (targets.indptr, targets.indices, targets.values) if is_sparse(targets) else (targets,):
        h.update(np.ascontiguousarray(part).tobytes())  # sparse: its CSR parts, never the dense matrix
    return h.hexdigest()[:16]


def settings_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two run settings ({"model": …, "train": …, "data": …})."""
    out = []
    for section in ("model", "train", "data"):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                if section == "data":
                    out.append(f"the {key} data (images or labels) differ")
                else:
                    out.append(f"{key.replace('_', '-')} was {old.get(key)!r}, now {new.get(key)!r}")
    return out
