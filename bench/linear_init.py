"""Cole et al.'s ``linear_init`` against fine-tuning from a fresh head, on MultiDigits with one positive label.

Both arms fine-tune the same pretrained digitnet backbone with ROLE, the same settings and seeds; they
differ only in where fine-tuning starts:

- fresh head: a randomly initialised linear head, ROLE's estimator from the observed labels;
- linear-init (``mlic train --mode linear-init``): first a linear probe on cached features (ROLE, Cole's
  batch 16, lr 1e-3, 25 epochs), then fine-tuning from its head AND its estimated labels.

The backbone is pretrained with full labels on a separate MultiDigits draw (``mlic.sweep.digits_backbone``, as
``recipes/sweeps/spl_multidigits.yaml`` uses it: new images from the train scans only, standing in for ImageNet).
Prints test mAP per seed, the means and the difference.

    python bench/linear_init.py [--seeds 2] [--finetune-epochs 6] [--out runs/linear_init]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mlic.config import ModelConfig, TrainConfig
from mlic.data.digits import build_multidigits
from mlic.data.observe import single_positive
from mlic.data.splits import Splits
from mlic.engine.job import TrainJob
from mlic.engine.run import run
from mlic.sweep import digits_backbone

QUIET = dict(progress=False, log=lambda *a, **k: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/linear_init"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: chosen by mlic)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = build_multidigits()
    weights = digits_backbone(args.out / "pretrained_backbone.safetensors", args.pretrain_epochs)
    print(f"pretrained backbone: {weights} ({time.perf_counter() - t0:.0f}s)", flush=True)
    clean = np.asarray(data["train"].targets)
    results: dict[str, list[float]] = {"fresh head": [], "linear-init": []}
    for s in range(args.seeds):
        train = data["train"].with_observed(single_positive(clean, seed=1200 + s))
        splits = Splits(train, data["val"], data["test"])
        cfg = TrainConfig(epochs=args.finetune_epochs, lr=2e-3, hflip=False, seed=s, loss="role", threads=args.threads)
        for arm, mode in (("fresh head", "finetune"), ("linear-init", "linear-init")):
            job = TrainJob(ModelConfig(num_classes=10), cfg, splits, args.out / f"{mode}_{s}", mode=mode,
                           linear=TrainConfig.linear_defaults(loss="role", seed=s, batch_size=16, lr=1e-3, epochs=25),
                           pretrained=str(weights), **QUIET)
            results[arm].append(run(job).test_metrics["mAP"])
            print(f"seed {s} {arm:12s} test mAP {results[arm][-1]:.2f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    fresh, init = np.mean(results["fresh head"]), np.mean(results["linear-init"])
    print(f"ROLE fine-tuned, {args.finetune_epochs} epochs, {args.seeds} seeds: fresh head {fresh:.2f}, "
          f"linear-init {init:.2f}, difference {init - fresh:+.2f} ({time.perf_counter() - t0:.0f}s in all)")


if __name__ == "__main__":
    main()
