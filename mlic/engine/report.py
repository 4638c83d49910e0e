"""What a run directory (and ``mlic eval --json``) gets besides the model: the metrics as strict JSON
(``test_metrics.json``, ``metrics.jsonl``, ``--json``), a short markdown report and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from mlic.io import atomic_write_bytes


def finite_or_none(value):
    """``value`` ready for strict JSON: every non-finite number (NaN, inf) becomes None, recursively.

    Dicts, lists, tuples and NumPy arrays are walked; NumPy scalars become Python numbers (keys too).
    A class without a known positive has AP NaN, which ``json.dumps`` would write as ``NaN``: not JSON.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key.item() if isinstance(key, np.generic) else key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def metrics_json(value, indent: int | None = None) -> str:
    """Strict JSON text of a metrics table or record (NaN and inf as ``null``); the one encoder of every
    metrics file mlic writes."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


def metrics_jsonl(records: list[dict]) -> str:
    """One strict JSON line per record (``metrics.jsonl``: one per epoch)."""
    return "".join(metrics_json(record) + "\n" for record in records)


def metrics_record(metrics: dict, classes: list[str]) -> dict:
    """A metrics table as it is written to JSON: ``per_class_ap`` (K,) becomes a dict by class name."""
    record = {k: v for k, v in metrics.items() if k != "per_class_ap"}
    if "per_class_ap" in metrics:
        per_class = metrics["per_class_ap"]
        record["per_class_ap"] = dict(per_class) if isinstance(per_class, dict) else \
            dict(zip(classes, np.asarray(per_class, dtype=np.float64).tolist()))
    return record


def write_metrics_json(path: str | os.PathLike, metrics: dict, classes: list[str]) -> None:
    """Write a metrics table (``test_metrics.json``, ``mlic eval --json``) atomically as strict JSON."""
    atomic_write_bytes(Path(path), metrics_json(metrics_record(metrics, classes), indent=1).encode())


def save_figure(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_per_class_ap(per_class_ap: np.ndarray, classes: list[str], path: Path) -> None:
    """Horizontal bars of AP per class, sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(np.nan_to_num(per_class_ap, nan=-1))
    height = max(2.5, 0.22 * len(classes) + 1)
    fig, ax = plt.subplots(figsize=(6, min(height, 40)))
    ax.barh([classes[i] for i in order], np.nan_to_num(per_class_ap[order]), color="#3b7dd8")
    ax.set_xlabel("AP (%)")
    ax.set_xlim(0, 100)
    ax.set_title("Average precision per class (test)")
    save_figure(fig, path)
    plt.close(fig)


def plot_pr_curves(scores: np.ndarray, targets: np.ndarray, classes: list[str], path: Path, max_classes: int = 20):
    """Precision–recall curves of up to ``max_classes`` classes (the most frequent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    counts = (targets == 1).sum(0)
    for k in np.argsort(-counts)[:max_classes]:
        known = targets[:, k] >= 0
        s, t = scores[known, k], targets[known, k] == 1
        if t.sum() == 0:
            continue
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(t[order])
        precision = tp / np.arange(1, len(tp) + 1)
        recall = tp / t.sum()
        ax.plot(recall, precision, lw=1, label=classes[k])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("Precision–recall (test)")
    save_figure(fig, path)
    plt.close(fig)


def plot_training(history: list[dict], path: Path) -> None:
    """Training loss and validation mAP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="#d8603b", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_mAP"] for h in history], "s-", color="#3b7dd8", label="val mAP")
    ax2.set_ylabel("val mAP (%)")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def metrics_markdown(metrics: dict, classes: list[str]) -> str:
    """The metrics table (and per-class AP) as markdown."""
    keys = ["mAP", "mAP_voc", "CP", "CR", "CF1", "OP", "OR", "OF1", "CF1_top3", "OF1_top3"]
    lines = ["| " + " | ".join(k for k in keys if k in metrics) + " |",
             "|" + "---|" * sum(k in metrics for k in keys),
             "| " + " | ".join(f"{metrics[k]:.2f}" for k in keys if k in metrics) + " |", ""]
    if "per_class_ap" in metrics:
        lines += ["| class | AP |", "|---|---|"]
        lines += [f"| {c} | {a:.2f} |" for c, a in zip(classes, metrics["per_class_ap"])]
    return "\n".join(lines)


def write_report(out_dir: Path, title: str, metrics: dict, classes: list[str], history: list[dict],
                 scores: np.ndarray | None = None, targets: np.ndarray | None = None, notes: list[str] = ()) -> Path:
    """Write report.md and its plots into ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    parts = [f"# {title}", "", *notes, "", "## Test metrics", "", metrics_markdown(metrics, classes), ""]
    if history:
        plot_training(history, out_dir / "training.png")
        parts += ["## Training", "", "![training curves](training.png)", ""]
    if "per_class_ap" in metrics:
        plot_per_class_ap(np.asarray(metrics["per_class_ap"]), classes, out_dir / "per_class_ap.png")
        parts += ["![per-class AP](per_class_ap.png)", ""]
    if scores is not None and targets is not None:
        keep = ~np.isnan(scores).any(axis=1)
        plot_pr_curves(scores[keep], np.asarray(targets)[keep], classes, out_dir / "pr_curves.png")
        parts += ["![precision-recall curves](pr_curves.png)", ""]
    path = out_dir / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
