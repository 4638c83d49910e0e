"""``--mode linear``: cache backbone features once, train a linear head on them in memory.

The run folder ends up like a fine-tuned one: ``model.safetensors`` + ``model.json`` (backbone and
the learned linear head, so ``mlic predict``/``eval`` work), ``loss.safetensors`` (the loss's state
at the best epoch, e.g. ROLE's estimator, for ``--init-from``), ``metrics.jsonl``, plus
``features/{train,val,test}.npy`` and, for a loss that learns labels (ROLE), ``estimated_labels.npy``
(its probabilities per training image; NaN rows for unreadable images).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from mlic.data.features import bad_rows, extract_features
from mlic.data.images import BadImageCheck
from mlic.engine.checkpoint import save_model
from mlic.engine.evaluate import evaluate_scores
from mlic.engine.job import RunResult, TrainJob
from mlic.engine.linear import LinearProbeConfig, train_linear_probe
from mlic.errors import MlicError
from mlic.io import atomic_save_npy, atomic_write_bytes
from mlic.losses import build_loss_for_data
from mlic.metrics import best_thresholds
from mlic.models.classifier import build_model


def probe_config(job: TrainJob) -> LinearProbeConfig:
    """The linear phase's settings: the loss of ``job.train``, the rest from ``job.linear`` or the probe's own
    fast defaults (25 epochs, batch 1024, lr 7e-3), with at least 32 steps per epoch on small data."""
    settings = {"loss": job.train.loss, "loss_args": job.train.loss_args, "seed": job.train.seed,
                "estimator_lr_mult": job.train.estimator_lr_mult, **job.linear}
    num_images = len(job.splits.train)
    if "batch_size" not in settings and num_images < 32 * LinearProbeConfig.batch_size:
        settings["batch_size"] = max(16, num_images // 32)
    return LinearProbeConfig.from_dict(settings)


def fit_linear(job: TrainJob) -> RunResult:
    """Extract (or reuse) features with the backbone, train the head, save a complete model."""
    model_cfg, out_dir, splits = job.model, Path(job.out), job.splits
    if model_cfg.head != "linear":
        raise MlicError(f"--mode linear trains a linear head; got --head {model_cfg.head}")
    if job.pretrained is None:
        job.log("note: no --pretrained weights: probing features of a randomly initialised backbone")
    t_start = time.perf_counter()
    probe = probe_config(job)
    model = build_model(model_cfg, pretrained=job.pretrained).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features, readable, targets = {}, {}, {}
    for name, ls in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if ls is None:
            continue
        check = BadImageCheck(name, len(ls), job.max_bad_images, job.strict_images)
        path = out_dir / "features" / f"{name}.npy"
        feats = extract_features(ls, model, path, device=device, workers=job.train.workers,
                                 progress=job.progress, check=check)
        rows = np.setdiff1d(np.arange(len(ls)), bad_rows(path))
        labels = np.asarray(ls.train_targets if name == "train" else ls.targets)
        if check.count:  # unreadable images are left out, not learned from as all-zero features
            job.log(f"{name}: skipped {check.count} unreadable images, e.g. {check.messages[0]}")
            feats, labels = feats[rows], labels[rows]
        features[name], readable[name], targets[name] = feats, rows, labels
    loss = build_loss_for_data(probe.loss, probe.loss_args, targets["train"], probe.epochs, probe.seed,
                               clean=np.asarray(splits.train.targets)[readable["train"]])
    result = train_linear_probe(features["train"], targets["train"], features["val"], targets["val"],
                                replace(probe, progress=job.progress),
                                features.get("test"), targets.get("test"), loss=loss)
    model.head.load_state_dict({"fc.weight": torch.from_numpy(result.weight), "fc.bias": torch.from_numpy(result.bias)})
    val_scores = 1 / (1 + np.exp(-result.scores(features["val"])))
    save_model(out_dir, model, model_cfg, splits.train.classes,
               thresholds=best_thresholds(val_scores, targets["val"]),
               extra={"mode": "linear", "probe": result.config.to_dict(), "epoch": result.best_epoch + 1})
    if result.loss_state:
        atomic_write_bytes(out_dir / "loss.safetensors",
                           save({k: v.contiguous() for k, v in result.loss_state.items()}))
    history = [{"epoch": h["epoch"] + 1, "train_loss": h["loss"], "val_mAP": h["val_map"],
                **{k: v for k, v in h.items() if k not in ("epoch", "loss", "val_map")}} for h in result.history]
    atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
    if result.estimator_logits is not None:
        estimated = np.full((len(splits.train), splits.train.num_classes), np.nan, np.float32)
        estimated[readable["train"]] = 1 / (1 + np.exp(-result.estimator_logits))
        atomic_save_npy(out_dir / "estimated_labels.npy", estimated)
    test_metrics, scores = None, None
    if splits.test is not None:
        scores = np.full((len(splits.test), splits.test.num_classes), np.nan, np.float32)
        scores[readable["test"]] = 1 / (1 + np.exp(-result.scores(features["test"])))
        test_metrics = evaluate_scores(scores, np.asarray(splits.test.targets), rows=readable["test"])
        test_metrics["unreadable_images"] = len(splits.test) - len(readable["test"])
    job.log(f"linear probe: {result.config.epochs} epochs in {result.seconds:.1f}s; best epoch "
            f"{result.best_epoch + 1} (val mAP {result.val_map:.2f})")
    return RunResult(out_dir, result.best_epoch + 1, result.val_map, test_metrics, history,
                     len(splits.train) - len(readable["train"]), scores, time.perf_counter() - t_start)
