"""Distributed helpers for torchrun + DDP. Without torchrun everything degrades to one process."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mlic.errors import MlicError


class DistError(MlicError):
    """This process cannot join the others; the message names the host and port and what to check."""


def _place() -> tuple[int, int, int] | None:
    """(rank, world, local rank) from torchrun's variables, else from srun's (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID); None for a single process.

    A task that srun started itself (``SLURM_STEP_NUM_TASKS`` > 1) without MASTER_ADDR / MASTER_PORT meets
    the others at the node srun was launched from (``SLURM_LAUNCH_NODE_IPADDR``), on a port derived from the
    job id, so that ``srun python -m mlic train`` is one DDP run, not N copies. A batch script run by
    sbatch carries SLURM_NTASKS but no step variables: it stays a single process.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" not in env:
        return None
    where = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "MASTER_ADDR" in env:
        return where[0], int(env["SLURM_NTASKS"]), where[1]
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", 1))
    if step_tasks > 1 and "SLURM_LAUNCH_NODE_IPADDR" in env:
        env.setdefault("MASTER_ADDR", env["SLURM_LAUNCH_NODE_IPADDR"])
        env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000))
        return where[0], step_tasks, where[1]
    return None


def world() -> tuple[int, int]:
    """(global rank, world size), before or after the process group is joined ((0, 1) for a single process)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    place = _place()
    return (0, 1) if place is None else place[:2]


def rank() -> int:
    """This process's global rank, before or after the process group is joined (0 for a single process).

    The one place that reads torchrun's and srun's variables for it: the CLI, the shards and the engine
    all ask here, so that exactly one process claims the run folder, writes and prints.
    """
    return world()[0]


def is_main_process() -> bool:
    """Whether this process is global rank 0: the one that writes and prints."""
    return rank() == 0


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun (or srun) describes; returns (rank, world, device).

    NCCL on CUDA, gloo on CPU. A plain ``python``/``mlic`` call returns (0, 1, cuda:0 or cpu). Joining waits
    ``MLIC_DIST_TIMEOUT`` seconds (default 600) for the others, then stops with a :class:`DistError`.
    """
    place = _place()
    if place is None:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = place
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        host = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        seconds = float(os.environ.get("MLIC_DIST_TIMEOUT", 600))
        try:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=seconds))
        except (RuntimeError, ValueError, TimeoutError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DistError(f"rank {rank} of {world} cannot join the process group at {host} within {seconds:g}s "
                            f"({reason}); check that every node reaches that host and port (firewall, "
                            "--rdzv_endpoint or MASTER_ADDR / MASTER_PORT) and that all nodes were started") from None
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (at the end of a run), so that the processes exit cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
