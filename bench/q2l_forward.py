"""CPU inference speed of our Q2L-R101-448 against a straightforward reference with the same weights.

The reference is the official forward written plainly: seq-first ``nn.MultiheadAttention``, a
fixed (1, d, 14, 14) position-encoding buffer, float32 eager. Both share one ResNet-101 backbone
module, so the full-model ratio is diluted by the backbone; the head-only ratio isolates the head.
Runs are interleaved (ours, reference, ours, ...) so that load from other processes hits both alike.

Usage: PYTHONPATH=. python bench/q2l_forward.py [--iters 5] [--threads 2] [--batch 2] [--force-bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlic.config import ModelConfig
from mlic.models.classifier import build_model
from mlic.models.heads import Query2LabelHead, sine_position_encoding

RELEASE_HEAD = {"hidden_dim": 2048, "dim_feedforward": 8192, "enc_layers": 1, "dec_layers": 2, "nheads": 4}


class ReferenceHead(nn.Module):
    """The official head, spelled out: seq-first nn.MultiheadAttention, a stored pe buffer, GroupWiseLinear."""

    def __init__(self, ours: Query2LabelHead, grid: int) -> None:
        super().__init__()
        d = ours.hidden_dim
        self.register_buffer("pe", sine_position_encoding(grid, grid, d).T.reshape(1, d, grid, grid).clone())

        def mha(src: nn.Module) -> nn.MultiheadAttention:
            m = nn.MultiheadAttention(d, src.num_heads, dropout=0.1)
            m.load_state_dict(src.state_dict())
            return m

        self.enc = nn.ModuleList()
        for layer in ours.encoder.layers:
            m = nn.Module()
            m.self_attn = mha(layer.self_attn)
            m.linear1, m.linear2, m.norm1, m.norm2 = layer.linear1, layer.linear2, layer.norm1, layer.norm2
            self.enc.append(m)
        self.dec = nn.ModuleList()
        for layer in ours.decoder.layers:
            m = nn.Module()
            m.multihead_attn = mha(layer.multihead_attn)
            m.linear1, m.linear2, m.norm2, m.norm3 = layer.linear1, layer.linear2, layer.norm2, layer.norm3
            self.dec.append(m)
        self.dec_norm, self.query_embed, self.fc = ours.decoder.norm, ours.query_embed, ours.fc
        self.input_proj = ours.input_proj

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        src = self.input_proj(features)
        b = src.shape[0]
        pos = self.pe.repeat(b, 1, 1, 1).flatten(2).permute(2, 0, 1)
        src = src.flatten(2).permute(2, 0, 1)
        for m in self.enc:
            q = src + pos
            src = m.norm1(src + m.self_attn(q, q, src)[0])
            src = m.norm2(src + m.linear2(F.relu(m.linear1(src))))
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        tgt = torch.zeros_like(query_pos)
        for m in self.dec:
            tgt = m.norm2(tgt + m.multihead_attn(tgt + query_pos, src + pos, src)[0])
            tgt = m.norm3(tgt + m.linear2(F.relu(m.linear1(tgt))))
        hs = self.dec_norm(tgt).transpose(0, 1)
        return (self.fc.W * hs).sum(-1) + self.fc.b


def cpu_has_bf16() -> tuple[bool, str]:
    """Native bf16 matrix support (AVX512-BF16 or AMX); without it autocast emulates bf16 slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False, "cannot read /proc/cpuinfo"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return bool(found), ", ".join(found) or f"no avx512_bf16/amx_bf16 (torch CPU capability: " \
                                            f"{torch.backends.cpu.get_cpu_capability()})"


def timed(fn, x: torch.Tensor) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=448)
    ap.add_argument("--force-bf16", action="store_true", help="time bf16 autocast even without native support")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = ModelConfig(backbone="resnet101", head="query2label", num_classes=80, img_size=args.img_size,
                         head_args=RELEASE_HEAD)
    model = build_model(config).eval()
    grid = args.img_size // 32
    ref_head = ReferenceHead(model.head, grid).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)

    def ours(images):
        return model(images)

    def reference(images):
        return ref_head(model.backbone(images))

    with torch.inference_mode():
        features = model.backbone(x)
        out, ref_out = model.head(features), ref_head(features)
        head_diff = (out - ref_out).abs().max().item()
        variants = {"ours": ours, "reference": reference}
        heads = {"ours_head": model.head, "reference_head": ref_head}

        cl_model = build_model(config).eval()
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        cl_diff = (cl_model(x_cl) - model(x)).abs().max().item()
        variants["ours_channels_last"] = lambda images: cl_model(x_cl)

        has_bf16, bf16_note = cpu_has_bf16()
        bf16_diff = None
        if has_bf16 or args.force_bf16:
            def ours_bf16(images):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return cl_model(x_cl)

            bf16_diff = (ours_bf16(x).float() - model(x)).abs().max().item()
            variants["ours_bf16_channels_last"] = ours_bf16

        for fn in list(variants.values()) + list(heads.values()):  # warm-up (allocator, oneDNN primitives)
            fn(features if fn in heads.values() else x)
        times: dict[str, list[float]] = {name: [] for name in [*variants, *heads]}
        for _ in range(args.iters):
            for name, fn in variants.items():
                times[name].append(timed(fn, x))
            for name, fn in heads.items():
                times[name].append(timed(fn, features))

    ips = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
    print(f"Q2L-R101-{args.img_size}, release head, batch {args.batch}, {args.threads} CPU threads, "
          f"median of {args.iters} interleaved runs (torch {torch.__version__})")
    for name, v in ips.items():
        print(f"  {name:26s} {v:8.3f} images/s")
    print(f"  ratio ours / reference (full model):  {ips['ours'] / ips['reference']:.3f}")
    print(f"  ratio ours / reference (head only):   {ips['ours_head'] / ips['reference_head']:.3f}")
    print(f"  ratio channels_last / ours:           {ips['ours_channels_last'] / ips['ours']:.3f}")
    if "ours_bf16_channels_last" in ips:
        print(f"  ratio bf16+channels_last / ours:      {ips['ours_bf16_channels_last'] / ips['ours']:.3f}")
    else:
        print(f"  bf16 autocast skipped: {bf16_note} (use --force-bf16 to time the emulated path)")
    print(f"  max |logit diff|: head vs reference {head_diff:.2e}, channels_last {cl_diff:.2e}"
          + (f", bf16 {bf16_diff:.2e}" if bf16_diff is not None else ""))
    result = {"bench": "q2l_forward", "img_size": args.img_size, "batch": args.batch, "threads": args.threads,
              "images_per_s": {k: round(v, 4) for k, v in ips.items()},
              "max_abs_diff": {"head_vs_reference": head_diff, "channels_last": cl_diff, "bf16": bf16_diff},
              "bf16": bf16_note}
    print(json.dumps(result))
    if head_diff > 1e-3 or cl_diff > 1e-2:
        raise SystemExit("outputs disagree with the reference")


if __name__ == "__main__":
    main()
