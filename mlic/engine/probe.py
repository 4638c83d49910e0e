"""``mlic train --mode linear``: cache backbone features once, train a linear head on them in memory.

The run folder ends up like a fine-tuned one: ``model.safetensors`` + ``model.json`` (backbone and
the learned linear head, so ``mlic predict``/``eval`` work), ``metrics.jsonl``, ``test_scores.npy``,
plus ``features/{train,val,test}.npy`` and, for ROLE, ``estimated_labels.npy`` (the estimator's
probabilities per training image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mlic.config import ModelConfig
from mlic.data.features import bad_rows, extract_features
from mlic.data.images import BadImageCheck
from mlic.data.labelset import LabelSet, atomic_save_npy, atomic_write_bytes
from mlic.engine.checkpoint import save_model
from mlic.engine.evaluate import evaluate_scores
from mlic.engine.linear import LinearProbeConfig, train_linear_probe
from mlic.metrics import best_thresholds
from mlic.models.classifier import build_model


@dataclass
class ProbeRun:
    """What a linear-probe run returns (the fields the CLI reads match ``RunResult``)."""

    out_dir: Path
    best_epoch: int
    best_val_map: float
    test_metrics: dict | None
    history: list[dict]
    bad_images: int = 0


def run_linear_probe(
    model_cfg: ModelConfig, probe: LinearProbeConfig, train_set: LabelSet, val_set: LabelSet,
    test_set: LabelSet | None, out_dir: str | Path, pretrained: str | Path | None = None, workers: int = 0,
    quiet: bool = False, log=print, max_bad_images: float = 0.01, strict_images: bool = False,
) -> ProbeRun:
    """Extract (or reuse) features with the backbone, train the head, save a complete model.

    Args:
        model_cfg: the backbone to extract with (its head must be "linear").
        probe: loss, epochs, batch size, lr, seed of the probe.
        train_set: training rows (observed labels used when present).
        val_set: validation rows, evaluated on clean labels.
        test_set: evaluated at the best epoch.
        out_dir: run folder.
        pretrained: local backbone weights (a probe on random features is rarely what you want).
        workers: DataLoader workers for the feature extraction.
        quiet: no progress bars.
        log: where to print.
        max_bad_images: unreadable images tolerated per split (a share < 1 or a count); they are left out.
        strict_images: stop at the first unreadable image.
    """
    if model_cfg.head != "linear":
        raise ValueError(f"--mode linear trains a linear head; got --head {model_cfg.head}")
    if pretrained is None:
        log("note: no --pretrained weights: probing features of a randomly initialised backbone")
    out_dir = Path(out_dir)
    model = build_model(model_cfg, pretrained=pretrained).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features, readable, targets = {}, {}, {}
    for name, ls in (("train", train_set), ("val", val_set), ("test", test_set)):
        if ls is None:
            continue
        check = BadImageCheck(name, len(ls), max_bad_images, strict_images)
        path = out_dir / "features" / f"{name}.npy"
        feats = extract_features(ls, model, path, device=device, workers=workers, progress=not quiet, check=check)
        rows = np.setdiff1d(np.arange(len(ls)), bad_rows(path))
        labels = np.asarray(ls.train_targets if name == "train" else ls.targets)
        if check.count:  # unreadable images are left out, not learned from as all-zero features
            log(f"{name}: skipped {check.count} unreadable images, e.g. {check.messages[0]}")
            feats, labels = feats[rows], labels[rows]
        features[name], readable[name], targets[name] = feats, rows, labels
    result = train_linear_probe(
        features["train"], targets["train"], features["val"], targets["val"], replace(probe, progress=not quiet),
        features.get("test"), targets.get("test"))
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.from_numpy(result.weight))
        model.head.fc.bias.copy_(torch.from_numpy(result.bias))
    val_scores = 1 / (1 + np.exp(-result.scores(features["val"])))
    save_model(out_dir, model, model_cfg, train_set.classes,
               thresholds=best_thresholds(val_scores, targets["val"]),
               extra={"mode": "linear", "probe": result.config.to_dict(),
                      "epoch": result.best_epoch + 1})
    history = [{"epoch": h["epoch"] + 1, "train_loss": h["loss"], "val_mAP": h["val_map"],
                **{k: v for k, v in h.items() if k not in ("epoch", "loss", "val_map")}} for h in result.history]
    atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
    if result.estimator_logits is not None:
        estimated = np.full((len(train_set), train_set.num_classes), np.nan, np.float32)
        estimated[readable["train"]] = 1 / (1 + np.exp(-result.estimator_logits))
        atomic_save_npy(out_dir / "estimated_labels.npy", estimated)
    test_metrics = None
    if test_set is not None:
        scores = np.full((len(test_set), test_set.num_classes), np.nan, np.float32)
        scores[readable["test"]] = 1 / (1 + np.exp(-result.scores(features["test"])))
        atomic_save_npy(out_dir / "test_scores.npy", scores)
        test_metrics = evaluate_scores(scores, np.asarray(test_set.targets), rows=readable["test"])
        test_metrics["unreadable_images"] = len(test_set) - len(readable["test"])
    log(f"linear probe: {result.config.epochs} epochs in {result.seconds:.1f}s; best epoch {result.best_epoch + 1} "
        f"(val mAP {result.val_map:.2f})")
    return ProbeRun(out_dir, result.best_epoch + 1, result.val_map, test_metrics, history,
                    len(train_set) - len(readable["train"]))
