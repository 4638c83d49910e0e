"""The shard index: sources (folder, pipe:, template), missing index, finding shard folders."""

from __future__ import annotations

import pytest
import torch

from mlic.data.images import build_transform
from mlic.data.shards import ShardDataset, ShardError, ShardIndex, is_shards, open_data

SIZE = 64


def test_sources_pipe_and_open_data(packed, tmp_path, rows):
    labelset, out, _ = packed
    transform = build_transform(SIZE, train=False)
    piped = rows(ShardDataset(f"pipe:cat {out}/{{shard}}", transform, shuffle=False))
    local = rows(ShardDataset(out, transform, shuffle=False))
    assert sorted(piped) == sorted(local) and all(torch.equal(piped[i][0], local[i][0]) for i in local)
    with pytest.raises(ShardError, match="needs \\{shard\\}"):
        ShardIndex.read(f"pipe:cat {out}")
    with pytest.raises(ShardError, match="index.json: not found.*mlic prepare shards"):
        ShardIndex.read(tmp_path)
    assert is_shards(out) and not is_shards(tmp_path)
    assert list(open_data(out)) == ["train"]
    with pytest.raises(ShardError, match="no index.json"):
        open_data(tmp_path)
