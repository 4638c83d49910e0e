"""torchrun + DDP on the CPU (gloo): two processes train one model; rank 0 alone writes and speaks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = dict(os.environ, MLIC_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mlic", "train", "--digits-size", "128,32,32",
         "--img-size", "32", "--epochs", "2", "--workers", "0", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained in") == 1  # rank 0 only
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert (out / "model.safetensors").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, leaves first."""
    import signal

    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_two_nodes_from_shards_kill_one_node_then_resume(digit_shards, tmp_path):
    """torchrun --nnodes 2 with the c10d rendezvous: two "nodes" of one process each on 127.0.0.1 (gloo) train
    from shards; one node is killed (SIGKILL to its agent and its worker) after the first epoch; the other
    stops; both nodes are started again with --resume and the run continues from the last checkpoint to the
    end."""
    import time

    import torch

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    shards = digit_shards(tmp_path)
    out = tmp_path / "run"
    # a rank whose peer died stops at its next collective (gloo sees the closed connection; at the latest after
    # MLIC_DIST_TIMEOUT seconds)
    env = dict(os.environ, MLIC_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", MLIC_DIST_TIMEOUT="60")

    def nodes(port, extra=()):
        command = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                   f"127.0.0.1:{port}", "--rdzv_id", f"mlic-{port}", "--max_restarts", "0", "-m", "mlic", "train",
                   "--data", str(shards), "--img-size", "64", "--epochs", "4", "--batch-size", "8", "--workers", "0",
                   "--threads", "1", "--out", str(out), "--quiet", *extra]
        started = []
        for _ in range(2):  # the first hosts the c10d store; the second, killed below, is a client node
            started.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=env, start_new_session=True))
            time.sleep(1)
        return started

    first = nodes(free_port())
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.02)
    kill_tree(first[1].pid)  # node 2, agent and worker (torchrun starts it in a session of its own), as a lost machine
    killed_at = time.time()
    outputs = [p.communicate(timeout=300)[0] for p in first]
    assert first[0].returncode != 0, outputs[0][-2000:]  # the surviving node stops instead of hanging
    print(f"the surviving node stopped {time.time() - killed_at:.1f}s after the kill")
    state = torch.load(out / "last.pt", weights_only=True)
    done = int(state["next_epoch"])
    assert 1 <= done < 4 and not (out / "test_metrics.json").exists()

    second = nodes(free_port(), ["--resume"])
    outputs = [p.communicate(timeout=600)[0] for p in second]
    assert [p.returncode for p in second] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    text = "".join(outputs)
    assert text.count(f"resumed from {out / 'last.pt'} after epoch {done}") == 1  # global rank 0 alone speaks
    assert text.count("trained in") == 1
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert json.loads((out / "test_metrics.json").read_text())["mAP"] > 0
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [".mlic-run.json", ".mlic.lock"]  # the run's manifest and lock; no stray temporary files


def test_unreachable_rendezvous_is_one_line_naming_host_and_port(monkeypatch):
    from mlic.engine import dist

    port = free_port()  # nothing listens there
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("MLIC_DIST_TIMEOUT", "2")
    with pytest.raises(dist.DistError, match=rf"rank 1 of 2 cannot join the process group at 127.0.0.1:{port} "
                                             r"within 2s \(.*\); check that every node reaches that host and port"):
        dist.init_distributed()


def test_place_from_torchrun_then_srun_variables(monkeypatch):
    from mlic.engine.dist import _place

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert _place() is None
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert _place() is None  # sbatch's script itself (no step variables, no MASTER_ADDR): one process
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert _place() == (5, 8, 1)  # a task srun started: the rendezvous is srun's launch node
    assert os.environ["MASTER_ADDR"] == "10.1.2.3" and os.environ["MASTER_PORT"] == "15777"
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert _place() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _place() == (2, 4, 0)  # torchrun inside srun: torchrun's variables win
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("RANK")
    assert _place() is None


def test_srun_alone_is_one_run_that_global_rank_0_writes_and_prints(tmp_path):
    """`srun -n 2 python -m mlic train` without torchrun: the two tasks see only SLURM's variables (no RANK, no
    MASTER_ADDR; a free MASTER_PORT, as the job-id port may be taken here); they join one DDP run at srun's
    launch node, and task 0 alone claims --out, writes, prints."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(MLIC_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
               SLURM_LAUNCH_NODE_IPADDR="127.0.0.1", SLURM_JOB_ID="1", MASTER_PORT=str(free_port()))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mlic", "train", "--digits-size", "128,32,32", "--img-size", "32", "--epochs", "2",
            "--workers", "0", "--out", str(out), "--quiet"]
    tasks = [subprocess.Popen(args, env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [t.communicate(timeout=300) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], "\n".join(err[-2000:] for _, err in outputs)
    assert outputs[0][0].count("trained in") == 1 and outputs[1][0] == ""  # task 1 says nothing
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".mlic-run.json", ".mlic.lock"]
