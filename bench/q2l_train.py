"""CUDA training and inference throughput of Q2L-R101-448 (release head) on synthetic data.

One training step is what the recipe does: bf16 autocast forward, ASL (γ-=2, γ+=0, clip 0,
eps 1e-5, ×1000), backward, AdamW, OneCycle, EMA update; conv1/bn1/layer1 frozen. Inference is
eval-mode forward under bf16 autocast. Each configuration warms up, synchronises, then times a
fixed number of steps; the last line printed is a JSON object with all results.

Usage: PYTHONPATH=. python bench/q2l_train.py [--batch 64] [--steps 20] [--warmup 5]
       [--variants bf16_cl,bf16,fp32_cl] [--compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mlic.config import ModelConfig
from mlic.losses.full import ASL
from mlic.models.classifier import build_model

RELEASE_HEAD = {"hidden_dim": 2048, "dim_feedforward": 8192, "enc_layers": 1, "dec_layers": 2, "nheads": 4}
FROZEN = ("conv1", "bn1", "layer1")
VARIANTS = {  # name -> (autocast dtype or None, channels_last)
    "bf16_cl": (torch.bfloat16, True),
    "bf16": (torch.bfloat16, False),
    "fp32_cl": (None, True),
    "fp16_cl": (torch.float16, True),
}


def build(img_size: int, num_classes: int, channels_last: bool, device: torch.device) -> torch.nn.Module:
    config = ModelConfig(backbone="resnet101", head="query2label", num_classes=num_classes, img_size=img_size,
                         head_args=RELEASE_HEAD)
    model = build_model(config)
    for name, p in model.backbone.body.named_parameters():
        if name.startswith(tuple(f"{f}." for f in FROZEN)):
            p.requires_grad_(False)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def bench_variant(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    dtype, channels_last = VARIANTS[name]
    torch.manual_seed(0)
    model = build(args.img_size, args.num_classes, channels_last, device)
    ema = [p.detach().clone() for p in model.parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, fused=True)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=total + 1, pct_start=0.2)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loss_fn = ASL(gamma_neg=2, gamma_pos=0, clip=0, eps=1e-5, scale=1000)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)
    targets = (torch.rand(args.batch, args.num_classes, device=device) < 0.04).to(torch.int8)
    step_model = torch.compile(model) if args.compile else model

    def train_step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = step_model(images)
        loss = loss_fn(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9997)
        return loss

    model.train()
    for _ in range(args.warmup):
        loss = train_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise SystemExit(f"{name}: non-finite loss {loss.item()}")
    peak_train = torch.cuda.max_memory_allocated() / 2**30

    model.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(args.warmup):
            step_model(images)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            out = step_model(images)
        torch.cuda.synchronize()
        infer_s = time.perf_counter() - start
    result = {
        "variant": name, "train_images_per_s": round(args.batch * args.steps / train_s, 1),
        "infer_images_per_s": round(args.batch * args.steps / infer_s, 1),
        "train_step_ms": round(1000 * train_s / args.steps, 2), "final_loss": round(loss.item(), 4),
        "peak_train_mem_gib": round(peak_train, 2), "finite_logits": bool(torch.isfinite(out).all()),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=448)
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", default="bf16_cl,bf16", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (adds compile time to warmup)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("q2l_train: no CUDA device found; this benchmark needs a GPU (run it on the H100/H200 machine)",
              file=sys.stderr)
        raise SystemExit(2)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = []
    for name in names:
        r = bench_variant(name, args, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(f"{name:8s} train {r['train_images_per_s']:8.1f} img/s ({r['train_step_ms']} ms/step)  "
              f"infer {r['infer_images_per_s']:8.1f} img/s  peak {r['peak_train_mem_gib']} GiB", flush=True)
        results.append(r)
    print(json.dumps({"bench": "q2l_train", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "batch": args.batch, "img_size": args.img_size, "steps": args.steps, "warmup": args.warmup,
                      "compile": args.compile, "results": results}))


if __name__ == "__main__":
    main()
