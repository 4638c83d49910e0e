"""How many torch threads and loader workers a run uses, chosen from the cores this process may use."""

from __future__ import annotations

import os

import torch


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(torch threads, loader workers): the options when given, else chosen from the core count.

    Torch threads plus busy loader workers beyond the core count slow CPU training by up to 10x (threads
    spin waiting for each other). On a GPU the CPU only decodes: one thread, the other cores as workers.
    On a CPU the matmuls need the cores: a worker per four cores, the rest as threads.
    """
    cores = cpu_count()
    if torch.cuda.is_available():
        auto_workers, auto_threads = min(8, max(cores - 1, 0)), 1
    else:
        auto_workers = cores // 4
        auto_threads = max(1, cores - auto_workers)
    workers = auto_workers if workers is None else workers
    threads = threads or (auto_threads if workers == auto_workers else max(1, cores - workers))
    return threads, workers
