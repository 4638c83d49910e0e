"""Where each label looks: Query2Label's per-label cross-attention maps, and a PNG of them.

The maps are the last decoder layer's cross-attention of each label query over the feature grid,
averaged over heads (each map sums to 1). They show what the query read, which is a good guide
to where the evidence for a label lies, though not a calibrated saliency measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mlic import __version__
from mlic.errors import MlicError
from mlic.models.heads import Query2LabelHead


def attention_maps(
    model: torch.nn.Module, images: torch.Tensor, return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-label cross-attention maps of a Query2Label classifier.

    Args:
        model: a Classifier whose head is "query2label".
        images: normalised images (B, 3, H, W) on the model's device.
        return_logits: also return the logits of the same forward pass.

    Returns:
        maps (B, K, h, w) on the feature grid (h = H / stride), each summing to 1 over (h, w);
        with ``return_logits``, (logits (B, K), maps).
    """
    head = getattr(model, "head", None)
    if not isinstance(head, Query2LabelHead):
        kind = getattr(getattr(model, "config", None), "head", type(head).__name__)
        raise MlicError(f"attention maps need a query2label model; this one has head '{kind}'")
    with torch.no_grad():
        logits, maps = head(model.backbone(images), return_attention=True)
    maps = maps.float()
    return (logits.float(), maps) if return_logits else maps


def preprocess(image: Image.Image, img_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL image -> normalised (1, 3, S, S) float tensor, as the evaluation transform does."""
    from mlic.data.images import build_transform, normalize, to_rgb

    pixels = build_transform(img_size, train=False)(to_rgb(image))
    return normalize(pixels.unsqueeze(0), tuple(mean), tuple(std))


def write_attention_png(
    model: torch.nn.Module, image: Image.Image | str | Path, out_path: str | Path, classes: Sequence[str],
    labels: Sequence[int] | None = None, thresholds: float | Sequence[float] = 0.5, max_labels: int = 12,
) -> list[tuple[str, float]]:
    """Write a PNG grid: the image, then each label's attention map over it, titled with name and score.

    Args:
        model: a Query2Label Classifier (its ``config`` gives img_size, mean, std).
        image: a PIL image or an image file.
        out_path: the PNG to write.
        classes: K label names.
        labels: label indices to show; default: those whose score ≥ their threshold, best first
            (the three best when none passes).
        thresholds: one threshold, or K per-class thresholds.
        max_labels: at most this many maps.

    Returns:
        the (label name, score) pairs shown, in order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(image, (str, Path)):
        from mlic.data.images import load_image

        image = load_image(image)
    config = model.config
    device = next(model.parameters()).device
    batch = preprocess(image, config.img_size, config.mean, config.std).to(device)
    was_training = model.training
    model.eval()
    try:
        logits, maps = attention_maps(model, batch, return_logits=True)
    finally:
        model.train(was_training)
    scores = torch.sigmoid(logits[0]).cpu().numpy()
    if len(classes) != len(scores):
        raise MlicError(f"{len(classes)} class names for a model with {len(scores)} outputs")
    note = ""
    if labels is None:
        thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), scores.shape)
        labels = [int(i) for i in np.argsort(-scores) if scores[i] >= thr[i]]
        if not labels:
            labels, note = [int(i) for i in np.argsort(-scores)[:3]], " (no label passed its threshold; best three)"
    labels = list(labels)[:max_labels]
    width, height = image.size
    maps = F.interpolate(maps[:, labels], size=(height, width), mode="bilinear", align_corners=False)[0]
    maps = maps.cpu().numpy()

    panels = len(labels) + 1
    cols = min(4, panels)
    rows = (panels + cols - 1) // cols
    aspect = height / max(width, 1)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows * aspect + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    pixels = np.asarray(image.convert("RGB"))
    axes[0].imshow(pixels)
    axes[0].set_title("input" + note, fontsize=9)
    shown = []
    for ax, k, attn in zip(axes[1:], labels, maps):
        lo, hi = float(attn.min()), float(attn.max())
        ax.imshow(pixels)
        ax.imshow((attn - lo) / (hi - lo + 1e-12), cmap="jet", alpha=0.5, extent=(0, width, height, 0))
        ax.set_title(f"{classes[k]} {scores[k]:.2f}", fontsize=10)
        shown.append((classes[k], float(scores[k])))
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    import io

    from mlic.io import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": f"mlic explain {__version__}"})  # how mlic knows its own
    atomic_write_bytes(out_path, buffer.getvalue())
    return shown
