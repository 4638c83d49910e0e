"""Server-side dynamic batching: concurrent requests share one forward pass.

Each request puts its images (uint8 (n, 3, S, S)) on a queue and awaits a future. One task takes the
first waiting request, keeps taking more until ``max_batch`` images are gathered or ``max_wait_ms``
has passed since the first, and runs the model on the concatenation in a single worker thread, so
the event loop never blocks and only one forward pass runs at a time (each uses all the cores).
While a batch runs, the next one gathers, which is why throughput grows with load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mlic.errors import MlicError


class DynamicBatcher:
    """Merge concurrent ``submit`` calls into batches for ``fn``.

    Args:
        fn: uint8 images (B, 3, S, S) -> scores (B, K); called in a worker thread.
        max_batch: most images per forward pass (a request with more runs alone); 1 turns batching off.
        max_wait_ms: how long the first request of a batch waits for company.
    """

    def __init__(self, fn: Callable[[torch.Tensor], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise MlicError("max_batch must be at least 1 and max_wait_ms at least 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlic-infer")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.images = 0

    async def submit(self, images: torch.Tensor) -> np.ndarray:
        """Scores (n, K) of uint8 images (n, 3, S, S), computed in a batch with whatever else is waiting."""
        if self.task is None or self.task.done():  # started lazily inside the server's own event loop
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending = None
        while True:
            first = pending or await self.queue.get()
            pending = None
            items, count = [first], len(first[0])
            deadline = loop.time() + self.max_wait
            while count < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(),
                                                                                               timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if count + len(item[0]) > self.max_batch:
                    pending = item  # starts the next batch
                    break
                items.append(item)
                count += len(item[0])
            items = [(x, f) for x, f in items if not f.cancelled()]  # clients that went away
            if not items:
                continue
            try:
                scores = await loop.run_in_executor(self.executor, self.fn, torch.cat([x for x, _ in items]))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.images += count
            start = 0
            for x, future in items:
                if not future.done():
                    future.set_result(scores[start:start + len(x)])
                start += len(x)

    def close(self) -> None:
        """Stop the batching task and the worker thread."""
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False)
