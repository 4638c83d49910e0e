"""Single-positive results table on MultiDigits: full-label BCE vs Cole et al.'s losses and the methods after them.

Methods: full labels (BCE); Cole et al.'s AN, AN-LS, WAN, EPR, ROLE; Large Loss (LL-R, LL-Ct, LL-Cp), LL-R with
the BoostLU head, EM and EM + APL, Hill and SPLC, GR Loss — each with its registry defaults (``mlic losses``).

Cole et al.'s protocol, scaled to the embedded data set:
1. A backbone is pretrained with full labels on a separate MultiDigits draw (``draw_seed=1``: new
   images composed from the train scans only, so test scans stay unseen) — our stand-in for
   ImageNet weights.
2. The main MultiDigits build (train 4000 / val 1000 / test 2000) gets single-positive labels on
   train (``single_positive``, seed 1200 + s); validation and test keep clean labels.
3. Linear probe: features cached once; each loss runs the lr grid {1e-3, 1e-2} × batch {16, 64} for
   25 epochs, the run and epoch picked by validation mAP.
   Fine-tuned: backbone + head end to end from the pretrained weights, fixed settings (6 epochs, lr 2e-3).
   LL-R + BoostLU has no linear-probe entry: BoostLU boosts each location of the class activation map
   before pooling, and the probe trains on pooled cached features, where it is not defined.
4. Test mAP (clean labels, scikit-learn AP) at the picked epoch; mean ± std over seeds.

Usage: ``python bench/spl_table.py [--seeds 3] [--finetune-epochs 6] [--out runs/spl] [--only ll_r,gr]``; writes
``results.md`` and ``results.json`` into ``--out`` and prints the table. ``results.json`` is written after
every seed and an entry already there is kept, so a stopped run continues where it was (``--fresh`` redoes all).
``--set ll_r:delta_rel=4`` adds a row of a method run with one loss argument changed (its linear-head row).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mlic.config import ModelConfig, TrainConfig
from mlic.data.digits import DigitsSpec, build_multidigits
from mlic.data.features import extract_features
from mlic.data.observe import single_positive
from mlic.data.splits import Splits
from mlic.engine.job import TrainJob
from mlic.engine.linear_probe import grid_search
from mlic.engine.run import run
from mlic.io import atomic_write_bytes
from mlic.models.classifier import build_model

# (row label, loss, trained on full labels, head)
METHODS = [("full labels (BCE)", "bce", True, "linear"), ("AN", "an", False, "linear"),
           ("AN-LS", "an_ls", False, "linear"), ("WAN", "wan", False, "linear"), ("EPR", "epr", False, "linear"),
           ("ROLE", "role", False, "linear"), ("LL-R", "ll_r", False, "linear"), ("LL-Ct", "ll_ct", False, "linear"),
           ("LL-Cp", "ll_cp", False, "linear"), ("LL-R + BoostLU", "ll_r", False, "boostlu"),
           ("EM", "em", False, "linear"), ("EM + APL", "em_apl", False, "linear"), ("Hill", "hill", False, "linear"),
           ("SPLC", "splc", False, "linear"), ("GR", "gr", False, "linear")]
QUIET = dict(progress=False, log=lambda *a, **k: None)


def pretrain_backbone(out: Path, epochs: int, threads: int | None = None) -> Path:
    """Train digitnet with full labels on a separate draw; save its backbone weights."""
    path = out / "pretrained_backbone.safetensors"
    if path.exists():
        return path
    pre = build_multidigits(spec=DigitsSpec(train=4000, val=500, test=0, draw_seed=1))
    cfg = TrainConfig(epochs=epochs, lr=4e-3, hflip=False, workers=0, threads=threads)
    run(TrainJob(ModelConfig(num_classes=10), cfg, Splits(pre["train"], pre["val"], None), out / "pretrain", **QUIET))
    from mlic.engine.checkpoint import load_model

    model, _ = load_model(out / "pretrain")
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, path)
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--no-finetune", action="store_true", help="linear probe only")
    parser.add_argument("--out", type=Path, default=Path("runs/spl"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: chosen by mlic)")
    parser.add_argument("--only", default="", help="comma-separated losses to run (default: every method)")
    parser.add_argument("--fresh", action="store_true", help="ignore results.json and run every entry again")
    parser.add_argument("--set", action="append", default=[], metavar="LOSS:KEY=VALUE",
                        help="run LOSS with a loss argument changed (a row of its own, e.g. ll_r:delta_rel=4)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = build_multidigits()
    weights = pretrain_backbone(args.out, args.pretrain_epochs, args.threads)
    print(f"pretrained backbone: {weights} ({time.perf_counter() - t0:.0f}s)")
    model_cfg = ModelConfig(num_classes=10)
    model = build_model(model_cfg, pretrained=weights).eval()
    feats = {s: np.asarray(extract_features(data[s], model, args.out / "features" / f"{s}.npy", progress=False))
             for s in ("train", "val", "test")}
    clean = {s: np.asarray(data[s].targets) for s in ("train", "val", "test")}
    k = float(clean["train"].sum(1).mean())
    saved = args.out / "results.json"
    results: dict[str, dict[str, list[float]]] = {}
    if saved.exists() and not args.fresh:
        results = json.loads(saved.read_text())
    only = {name for name in args.only.split(",") if name}
    changed: dict[str, dict] = {}
    for item in args.set:
        loss, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        changed.setdefault(loss, {})[key] = json.loads(value)
    methods = METHODS if not changed else [
        (f"{name} ({', '.join(f'{a}={v}' for a, v in changed[loss].items())})", loss, full, head)
        for name, loss, full, head in METHODS if loss in changed and head == "linear"]
    for name, loss, full, head in methods:
        row = results.setdefault(name, {"linear": [], "finetune": []})
        if only and loss not in only:
            continue
        for s in range(args.seeds):
            observed = clean["train"] if full else single_positive(clean["train"], seed=1200 + s)
            loss_args = {"expected_positives": k} if loss in ("epr", "role") else {}
            loss_args.update(changed.get(loss, {}))
            if head == "linear" and len(row["linear"]) <= s:
                probe = TrainConfig.linear_defaults(loss=loss, loss_args=loss_args, epochs=25, seed=s)
                grid = grid_search(feats["train"], observed, feats["val"], clean["val"], probe, batch_sizes=(16, 64),
                                   lrs=(1e-3, 1e-2), test_x=feats["test"], test_y=clean["test"])
                row["linear"].append(grid.best.test_map)
            if not args.no_finetune and len(row["finetune"]) <= s:
                tr = data["train"].with_observed(None if full else observed)
                cfg = TrainConfig(epochs=args.finetune_epochs, lr=2e-3, hflip=False, workers=0, seed=s, loss=loss,
                                  loss_args=loss_args, threads=args.threads)
                splits = Splits(tr, data["val"], data["test"])
                tag = "".join(f"_{a}{v}" for a, v in changed.get(loss, {}).items())
                folder = args.out / f"ft_{loss}{tag}{'' if head == 'linear' else '_' + head}_{s}"
                result = run(TrainJob(replace(model_cfg, head=head), cfg, splits, folder, pretrained=str(weights),
                                      **QUIET))
                row["finetune"].append(result.test_metrics["mAP"])
            atomic_write_bytes(saved, json.dumps(results, indent=1).encode())
            cells = [f"{mode} {row[key][s]:.2f}" for mode, key in (("linear", "linear"), ("fine-tuned", "finetune"))
                     if len(row[key]) > s]
            print(f"{name:18s} seed {s}: {'  '.join(cells)}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    lines = ["| method | linear probe (test mAP) | fine-tuned (test mAP) |", "|---|---|---|"]
    for name in [m[0] for m in METHODS] + [n for n in results if n not in {m[0] for m in METHODS}]:
        row = results.get(name, {"linear": [], "finetune": []})
        cells = []
        for mode in ("linear", "finetune"):
            cells.append("—" if not row[mode] else "{:.2f} ± {:.2f}".format(*mean_std(row[mode])))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    table = "\n".join(lines)
    note = (f"MultiDigits (train 4000 / val 1000 / test 2000), single positive label per training image, "
            f"mean ± std over {args.seeds} seeds; {time.perf_counter() - t0:.0f}s on {torch.get_num_threads()} "
            "threads. Made by `python bench/spl_table.py`.")
    atomic_write_bytes(args.out / "results.md", (table + "\n\n" + note + "\n").encode())
    print(table)
    print(note)


if __name__ == "__main__":
    main()
