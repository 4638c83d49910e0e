"""How ML-Decoder's forward cost grows with the number of classes K, against one query per class.

Head only, on TResNet-sized feature maps (B, 2048, 14, 14) = a 448-pixel input: ML-Decoder with the
official ``num_of_groups=-1`` (at most 100 queries; each yields ceil(K/100) logits through the group FC)
and the baseline a Query2Label-style decoder with one query per class (``num_of_groups=K``, same layer).
K = 80 (COCO), 1,000 (ImageNet) and 9,605 (OpenImages). Runs are interleaved so other load hits all alike;
the median of ``--iters`` timed forwards (after one warm-up) is reported, with the FLOPs torch counts.

Usage: PYTHONPATH=. python bench/ml_decoder_classes.py [--iters 5] [--threads 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlic.models.ml_decoder import MLDecoderHead

CLASSES = (80, 1000, 9605)


def flops(head: torch.nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(x)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=14, help="feature map side (14 = 448-pixel input)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 2048, args.grid, args.grid)
    heads = {}
    for k in CLASSES:
        heads[("ml_decoder", k)] = MLDecoderHead(2048, k).eval()
        heads[("per_class", k)] = MLDecoderHead(2048, k, num_of_groups=k).eval()
    times: dict[tuple, list[float]] = {name: [] for name in heads}
    with torch.no_grad():
        for head in heads.values():
            head(x)  # warm-up
        for _ in range(args.iters):
            for name, head in heads.items():
                t0 = time.perf_counter()
                head(x)
                times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    gflops = {name: flops(head, x) / 1e9 for name, head in heads.items()}
    print(f"ML-Decoder head forward, batch {args.batch}, features (2048, {args.grid}, {args.grid}), "
          f"{args.threads} CPU threads, median of {args.iters}")
    print(f"  {'classes':>8s} {'queries':>8s} {'ms':>9s} {'GFLOP':>8s} | {'1 query/class ms':>17s} {'GFLOP':>8s} "
          f"| {'ratio':>6s}")
    for k in CLASSES:
        ours, base = ("ml_decoder", k), ("per_class", k)
        print(f"  {k:8d} {heads[ours].num_groups:8d} {ms[ours]:9.1f} {gflops[ours]:8.2f} | {ms[base]:17.1f} "
              f"{gflops[base]:8.2f} | {ms[base] / ms[ours]:6.2f}")
    first, last = CLASSES[0], CLASSES[-1]
    print(f"  K {first} -> {last} ({last / first:.0f}x classes): ML-Decoder time x"
          f"{ms[('ml_decoder', last)] / ms[('ml_decoder', first)]:.2f}, FLOPs x"
          f"{gflops[('ml_decoder', last)] / gflops[('ml_decoder', first)]:.2f}; one query per class time x"
          f"{ms[('per_class', last)] / ms[('per_class', first)]:.2f}, FLOPs x"
          f"{gflops[('per_class', last)] / gflops[('per_class', first)]:.2f}")
    extra = heads[("ml_decoder", 9605)].num_groups * heads[("ml_decoder", 9605)].duplicate_factor - 1000
    slope = (gflops[("ml_decoder", 9605)] - gflops[("ml_decoder", 1000)]) * 1e9 / extra
    print(f"  ML-Decoder FLOPs per extra group-FC column (K 1000 -> 9605, {extra} columns): {slope:.0f} "
          f"= 2 x batch x D = {2 * args.batch * 768}: only the group FC grows with K")
    print(json.dumps({"ms": {f"{n}_{k}": round(v, 2) for (n, k), v in ms.items()},
                      "gflop": {f"{n}_{k}": round(v, 3) for (n, k), v in gflops.items()}}))


if __name__ == "__main__":
    main()
