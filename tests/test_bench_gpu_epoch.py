"""bench/gpu_epoch.py: its --smoke run (CPU, tiny sizes) prints every row, and a user's mistakes are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_epoch.py"
ROWS = ("1 Cole fine-tuning", "2 Q2L train step", "3 data path", "4 mlic serve")


def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_smoke_prints_every_row_and_says_what_was_not_measured(tmp_path):
    done = run("--smoke", "--data", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "row"
    assert {line.split("|")[1].strip() for line in table[1:]} == set(ROWS)
    assert len(table[0].split("|")) == 9  # row, variant, ours, baseline, ratio, utilisation, limit
    assert "not measured: 1 Cole fine-tuning, baseline: official train.py (give --cole PATH)" in lines
    assert "not measured: 2 Q2L train step, baseline: official main_mlc.py (give --q2l PATH)" in lines
    result = json.loads(lines[-1])
    assert result["bench"] == "gpu_epoch" and result["smoke"] is True
    by_variant = {(r["row"], r["variant"]): r for r in result["rows"]}
    for key in (("1 Cole fine-tuning", "mlic train, CPU workers"),
                ("2 Q2L train step", "mlic step, bf16 channels-last"),
                ("3 data path", "mlic loader, CPU workers"), ("4 mlic serve", "batching on vs off, 4 clients")):
        assert by_variant[key]["ours"]["images_per_s"] > 0, key
    assert by_variant[("3 data path", "mlic loader, CPU workers")]["base"]["images_per_s"] > 0  # ImageFolder + PIL
    assert by_variant[("4 mlic serve", "batching on vs off, 4 clients")]["base"]["images_per_s"] > 0
    cole = by_variant[("1 Cole fine-tuning", "mlic train, CPU workers")]["ours"]
    assert 7e9 < cole["flops_per_image"] / 3 < 9e9  # ResNet-50 at 224: 4.1 GMACs forward
    # the data are Cole et al.'s formatted layout, COCO-shaped JPEGs
    coco = tmp_path / "data" / "data" / "coco"
    names = [str(n) for n in np.load(coco / "formatted_train_images.npy")]
    assert names[0] == "train2014/COCO_train2014_000000000000.jpg" and (coco / names[0]).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_gpu_without_smoke_is_one_line(tmp_path):
    done = run("--data", str(tmp_path / "data"), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA GPU" in done.stderr and "--smoke" in done.stderr
    assert not (tmp_path / "data").exists()


def test_cole_checkout_of_another_layout_is_one_line(tmp_path):
    (tmp_path / "cole").mkdir()
    (tmp_path / "cole" / "models.py").write_text("")
    done = run("--smoke", "--data", str(tmp_path / "data"), "--cole", str(tmp_path / "cole"), timeout=300)
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.count("\n") == 0, message
    assert "--cole" in message and "expected" in message and "missing train.py" in message
    assert "elijahcole/single-positive-multi-label" in message


def test_q2l_checkout_missing_is_one_line(tmp_path):
    done = run("--smoke", "--data", str(tmp_path / "data"), "--q2l", str(tmp_path / "nowhere"), timeout=300)
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.count("\n") == 0 and "main_mlc.py" in message and "SlongLiu/query2labels" in message
