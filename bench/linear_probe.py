"""Benchmark: ROLE linear probe on COCO-sized synthetic features, a plain PyTorch loop vs mlic's fast path.

The data imitate Cole et al.'s COCO linear-probe setting: 82,081 official-train images (split
65,665 / 16,416 by :func:`mlic.data.labelset.cole_split`) and 40,137 test images, 2048-d
non-negative features, 80 classes, ≈2.9 positives per image with skewed class frequencies. Labels
come from a random linear teacher over a low-dimensional latent, plus label noise; features are a
noisy random lift of the same latent. Training labels are single positives (Cole's
RandomState(1200) draw, rows in order, before the split); validation uses clean labels.

(a) baseline: a straightforward per-batch loop as their code does it — DataLoader over the
    features with batch 16, ``nn.Linear``, the registered ROLE loss reading the estimator rows of
    the batch, one ``torch.optim.Adam`` with the estimator as a dense group at lr × 10 — and
    vectorised validation mAP each epoch (their per-example metric loops are not timed).
(b) ours: :func:`mlic.engine.linear_probe.train_linear_probe` (the one loop, in memory) with the default
    config (batch 1024, lr 7e-3, lazy row-wise estimator update).
(c) our trainer at (a)'s settings (batch 16, lr 1e-3) with the lazy estimator update, which
    follows dense Adam's trajectory (up to Adam's eps): the official settings' 25-epoch mAP in
    minutes instead of hours, and a check that both estimator updates reach the same mAP.

Every run does 25 epochs by default. (a) takes about 6 minutes per epoch on one core here;
``--baseline-epochs E`` runs it for E epochs only, reports its measured time per epoch, says that
its 25-epoch time is extrapolated, and prints (a)'s and (c)'s validation mAP side by side for the
epochs both ran.

    PYTHONPATH=. python bench/linear_probe.py --baseline-epochs 3   # full size, (a) for 3 epochs
    PYTHONPATH=. python bench/linear_probe.py --quick               # 1/8 size, 5 epochs, ~1 minute
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from mlic.config import TrainConfig
from mlic.data.labelset import cole_split
from mlic.data.observe import single_positive
from mlic.engine.linear_probe import train_linear_probe
from mlic.losses import build_loss
from mlic.metrics import mean_average_precision


def make_synthetic(num_train: int = 82_081, num_test: int = 40_137, dim: int = 2048, num_classes: int = 80,
                   latent: int = 32, positives: float = 2.9, label_noise: float = 0.25, feature_noise: float = 0.5,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Features (float32, ≥ 0) and clean labels (int8 0/1) for a train and a test set.

    Every image has at least one positive; class frequencies are log-uniform (≈0.4 % to 25 %),
    rescaled so that the mean number of positives per image is ``positives``.
    """
    rng = np.random.default_rng(seed)
    lift = rng.standard_normal((latent, dim)).astype(np.float32) / math.sqrt(latent)
    teacher = rng.standard_normal((latent, num_classes)).astype(np.float32) / math.sqrt(latent)
    freq = np.exp(rng.uniform(np.log(0.004), np.log(0.25), num_classes))
    freq *= positives / freq.sum() * 0.975  # images left without a positive get one below
    thresholds = None
    out = {}
    for split, n in (("train", num_train), ("test", num_test)):
        z = rng.standard_normal((n, latent)).astype(np.float32)
        # constant norm: otherwise images far from the origin pass many class thresholds at once, and the
        # number of positives (hence the single-positive draw) would depend on how confident each label is
        z *= math.sqrt(latent) / np.linalg.norm(z, axis=1, keepdims=True)
        score = z @ teacher + label_noise * rng.standard_normal((n, num_classes)).astype(np.float32)
        if thresholds is None:
            thresholds = np.array([np.quantile(score[:, k], 1 - freq[k]) for k in range(num_classes)])
        labels = (score > thresholds).astype(np.int8)
        empty = labels.sum(axis=1) == 0
        labels[np.nonzero(empty)[0], np.argmax((score - thresholds)[empty], axis=1)] = 1
        x = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, 8192):  # chunked to keep the temporary small
            chunk = z[start:start + 8192] @ lift
            chunk += feature_noise * rng.standard_normal(chunk.shape, dtype=np.float32)
            np.maximum(chunk, 0, out=chunk)
            x[start:start + 8192] = chunk
        out[f"{split}_x"], out[f"{split}_y"] = x, labels
    return out


def baseline_role(train_x, train_y, val_x, val_y, epochs: int, batch_size: int = 16, lr: float = 1e-3,
                  lr_mult: float = 10.0, expected_positives: float = 2.9, seed: int = 0) -> dict:
    """A plain per-batch loop in the manner of the official code; returns per-epoch times and val mAP."""
    torch.manual_seed(seed)
    n, c = train_x.shape
    k = train_y.shape[1]
    data = torch.utils.data.TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.arange(n))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    head = nn.Linear(c, k)
    loss_fn = build_loss("role", num_images=n, num_classes=k, expected_positives=expected_positives,
                         observed=train_y, seed=seed)
    optimizer = torch.optim.Adam([{"params": head.parameters(), "lr": lr},
                                  {"params": loss_fn.parameters(), "lr": lr * lr_mult}], lr=lr)
    val = torch.from_numpy(val_x)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for x, y, idx in loader:
            optimizer.zero_grad()
            loss = loss_fn(head(x), y, idx)
            loss.backward()
            optimizer.step()
        train_s = time.perf_counter() - t0
        with torch.no_grad():
            val_map = mean_average_precision(head(val).numpy(), val_y)
        history.append({"epoch": epoch, "train_s": train_s, "seconds": time.perf_counter() - t0, "val_map": val_map,
                        "weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()})
        print(f"  baseline epoch {epoch + 1}/{epochs}: {history[-1]['seconds']:.1f} s, val mAP {val_map:.2f}",
              flush=True)
    return {"history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/8 of the images, 5 epochs (about a minute)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default 25, quick 5)")
    parser.add_argument("--baseline-epochs", type=int, default=None,
                        help="run the baseline (a) for this many epochs only; its full time is then extrapolated")
    parser.add_argument("--skip-batch16-fast", action="store_true",
                        help="skip (c), our trainer at the official batch 16 / lr 1e-3 with the fast estimator")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every run (1: robust on a shared 2-core machine; try 2 on an idle one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = 8 if args.quick else 1
    epochs = args.epochs or (5 if args.quick else 25)
    base_epochs = min(args.baseline_epochs or epochs, epochs)

    t0 = time.perf_counter()
    data = make_synthetic(82_081 // scale, 40_137 // scale, seed=args.seed)
    observed = single_positive(data["train_y"], seed=1200)  # Cole: RandomState(1200), rows in order, before the split
    train_rows, val_rows = cole_split(len(observed))
    train_x, train_y = data["train_x"][train_rows], observed[train_rows]
    val_x, val_y = data["train_x"][val_rows], data["train_y"][val_rows]  # clean validation labels
    test_x, test_y = data["test_x"], data["test_y"]
    print(f"data: train {train_x.shape}, val {val_x.shape}, test {test_x.shape}, 80 classes, "
          f"{data['train_y'].sum(1).mean():.2f} positives/image, single-positive training labels "
          f"(made in {time.perf_counter() - t0:.0f} s); torch threads {args.threads}")
    rows = []

    print(f"(a) plain loop: DataLoader, batch 16, lr 1e-3, dense Adam (estimator lr x10), {base_epochs} epochs")
    base = baseline_role(train_x, train_y, val_x, val_y, base_epochs, seed=args.seed)["history"]
    best = max(base, key=lambda h: h["val_map"])
    base_test = mean_average_precision(
        torch.nn.functional.linear(torch.from_numpy(test_x), best["weight"], best["bias"]).numpy(), test_y)
    base_epoch_s = float(np.mean([h["seconds"] for h in base]))
    note = f" (ran {base_epochs}, time extrapolated)" if base_epochs < epochs else ""
    rows.append(("(a) plain loop, b16, dense Adam" + note, base_epoch_s, base_epoch_s * epochs, best["epoch"] + 1,
                 best["val_map"], base_test))

    config = TrainConfig.linear_defaults(loss="role", loss_args={"expected_positives": 2.9}, epochs=epochs,
                                         seed=args.seed, matmul_threads=args.threads)
    print(f"(b) mlic fast path: batch {config.batch_size}, lr {config.lr:g}, estimator '{config.estimator_update}'")
    ours = train_linear_probe(train_x, train_y, val_x, val_y, config, test_x, test_y)
    rows.append((f"(b) mlic, b{config.batch_size}, fast estimator", ours.seconds / epochs, ours.seconds,
                 ours.best_epoch, ours.val_map, ours.test_map))

    if not args.skip_batch16_fast:
        cfg = replace(TrainConfig.official_linear(loss="role", loss_args={"expected_positives": 2.9}, seed=args.seed,
                                                  matmul_threads=args.threads), epochs=epochs, estimator_update="fast")
        print("(c) mlic trainer at (a)'s settings (batch 16, lr 1e-3) with the fast (lazy) estimator update")
        same = train_linear_probe(train_x, train_y, val_x, val_y, cfg, test_x, test_y)
        rows.append(("(c) mlic, b16, fast estimator", same.seconds / epochs, same.seconds, same.best_epoch,
                     same.val_map, same.test_map))

    print()
    print(f"{'':58s}{'s/epoch':>9s}{f'{epochs}-ep s':>10s}{'best ep':>9s}{'val mAP':>9s}{'test mAP':>9s}")
    for name, per_epoch, total, best_epoch, val_map, test_map in rows:
        print(f"{name:58s}{per_epoch:9.2f}{total:10.1f}{best_epoch:9d}{val_map:9.2f}{test_map:9.2f}")
    print(f"speed-up (a)/(b): {rows[0][2] / rows[1][2]:.1f}x per {epochs} epochs")
    if base_epochs == epochs:
        print(f"test mAP (b) - (a): {rows[1][5] - rows[0][5]:+.2f}")
    if not args.skip_batch16_fast:
        pairs = ", ".join(f"{a['val_map']:.1f}/{c['val_mAP']:.1f}" for a, c in zip(base, same.history))
        print(f"val mAP per epoch, (a) dense / (c) lazy estimator at the same settings: {pairs}")
        if base_epochs < epochs:
            print(f"official settings after {epochs} epochs, from (c) (same optimiser trajectory as (a)): test mAP "
                  f"{same.test_map:.2f}; (b) - (c): {ours.test_map - same.test_map:+.2f}")
    print("mAP is on clean labels at the epoch with the best validation mAP (clean validation labels); "
          "(a) is timed without its evaluation's per-example Python loops, which mlic.metrics replaces.")


if __name__ == "__main__":
    main()
