"""The labels row code of a shard sample round-trips every row."""

from __future__ import annotations

import json

import numpy as np

from mlic.data.shards.row_code import decode_row, encode_row


def test_row_codes_round_trip():
    for row in ([0, 0, 1, 0, -1], [-1, -1, 1, 0, -1], [1, 1, 1, 1, 1], []):
        row = np.array(row, np.int8)
        code = encode_row(row)
        np.testing.assert_array_equal(decode_row(json.loads(json.dumps(code)), row.size), row)
    assert encode_row(np.array([0, 0, 1, 0, -1], np.int8)) == {"fill": 0, "1": [2], "-1": [4]}
