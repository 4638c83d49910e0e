"""Dynamic batching: concurrent requests share forward passes, each gets its own rows back."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from mlic.serve.batcher import DynamicBatcher


def run(coro):
    return asyncio.run(coro)


def fake_model(calls: list):
    def fn(images: torch.Tensor) -> np.ndarray:
        calls.append(len(images))
        time.sleep(0.02)  # a forward pass takes time: requests pile up meanwhile
        return images.float().mean(dim=(1, 2, 3), keepdim=False).numpy()[:, None]
    return fn


async def many(batcher: DynamicBatcher, sizes: list[int]) -> list[np.ndarray]:
    requests = [torch.full((n, 3, 2, 2), i, dtype=torch.uint8) for i, n in enumerate(sizes)]
    out = await asyncio.gather(*(batcher.submit(x) for x in requests))
    batcher.close()
    return out


def test_concurrent_requests_are_merged_and_split_back():
    calls: list[int] = []
    sizes = [1, 2, 1, 3, 1, 1, 2, 1] * 3
    out = run(many(DynamicBatcher(fake_model(calls), max_batch=8, max_wait_ms=20), sizes))
    assert [len(o) for o in out] == sizes
    assert all(np.all(o == i) for i, o in enumerate(out))  # each request got its own images' rows
    assert sum(calls) == sum(sizes) and max(calls) <= 8 and len(calls) < len(sizes) / 2


def test_batching_off_and_failures_reach_every_waiter():
    calls: list[int] = []
    run(many(DynamicBatcher(fake_model(calls), max_batch=1, max_wait_ms=0), [1, 1, 1]))
    assert calls == [1, 1, 1]

    def broken(images):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run(many(DynamicBatcher(broken, max_batch=4), [1, 1]))
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(broken, max_batch=0)
