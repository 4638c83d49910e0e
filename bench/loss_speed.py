"""What each partial-label method costs per training epoch, against AN, measured in the same run.

One fine-tuning epoch of digitnet on MultiDigits with one positive label per image, through the engine
(``mlic.engine.run.run``: data loading, forward, the loss and its hooks, backward, step), once per loss,
interleaved round by round; the best round of each is reported, so other load on the machine counts
against no loss in particular. EM + APL's extra pass over the training set (its ``end_epoch``, after each
epoch past its warm-up) is part of the method, documented, and not in these one-epoch figures.

    python bench/loss_speed.py [--images 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlic.config import ModelConfig, TrainConfig
from mlic.data.digits import DigitsSpec, build_multidigits
from mlic.data.observe import single_positive
from mlic.data.splits import Splits
from mlic.engine.job import TrainJob
from mlic.engine.run import run

LOSSES = ["an", "an_ls", "wan", "epr", "role", "ll_r", "ll_ct", "ll_cp", "em", "em_apl", "hill", "splc", "gr"]


def epoch_seconds(loss: str, splits: Splits, out: Path, epochs: int) -> float:
    """Training seconds of the last epoch (validation excluded), from the run's own log."""
    args = {"warmup_epochs": 0} if loss == "em_apl" else {}  # its warm-up must be shorter than the run
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, hflip=False, loss=loss, loss_args=args, workers=0)
    result = run(TrainJob(ModelConfig(num_classes=10, img_size=32), cfg, splits, out, progress=False,
                          log=lambda *a, **k: None))
    return result.history[-1]["train_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_multidigits(Path(tmp) / "cache", DigitsSpec(train=args.images, val=200, test=0, img_size=32))
        observed = single_positive(np.asarray(data["train"].targets), 1200)
        splits = Splits(data["train"].with_observed(observed), data["val"], None)
        best: dict[str, float] = {}
        for r in range(args.rounds):
            for loss in LOSSES:
                seconds = epoch_seconds(loss, splits, Path(tmp) / f"{loss}_{r}", epochs=1)
                best[loss] = min(best.get(loss, float("inf")), seconds)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in best.items()), flush=True)
    base = best["an"]
    print(f"\none training epoch, {args.images} images at 32 px, batch 64, best of {args.rounds} rounds")
    print(f"{'loss':8s} {'seconds':>8s} {'vs AN':>7s}")
    for loss in LOSSES:
        print(f"{loss:8s} {best[loss]:8.2f} {best[loss] / base:6.2f}x")
    print("(a one-epoch run: em_apl's end-of-epoch pass over the training set, which follows every epoch after its "
          "warm-up but the last, is not in these figures)")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.0f}s in all")
