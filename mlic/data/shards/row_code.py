"""The labels of a shard sample: an int8 target row (K,) as compact JSON (``<key>.labels.json``)."""

from __future__ import annotations

import numpy as np


def encode_row(row: np.ndarray) -> dict[str, object]:
    """An int8 target row (K,) as compact JSON: its most common value and the class ids of the others.

    ``{"fill": 0, "1": [3, 17]}`` is a fully labelled row with two positives; ``{"fill": -1, "1": [5], "0": [9]}``
    a partial one. Rows of OpenImages (9,605 classes, ~8 known) take a few dozen bytes.
    """
    row = np.asarray(row, dtype=np.int8)
    values, counts = np.unique(row, return_counts=True)
    fill = int(values[np.argmax(counts)]) if row.size else -1
    code: dict[str, object] = {"fill": fill}
    for value in (1, 0, -1):
        if value != fill:
            ids = np.flatnonzero(row == value)
            if ids.size:
                code[str(value)] = ids.tolist()
    return code


def decode_row(code: dict, num_classes: int) -> np.ndarray:
    """The int8 row (K,) :func:`encode_row` encoded."""
    row = np.full(num_classes, int(code["fill"]), dtype=np.int8)
    for value in ("1", "0", "-1"):
        if value in code:
            row[np.asarray(code[value], dtype=np.int64)] = int(value)
    return row
