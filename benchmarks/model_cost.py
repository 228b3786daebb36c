"""Parameters, FLOPs and CPU forward time of every SCG-Net variant on one window.

Usage:
    python benchmarks/model_cost.py [--window 448] [--classes 6] [--backbone resnet50]

FLOPs are counted by ``torch.utils.flop_counter`` (convolutions and matrix products, 2 per
multiply-add); the paper gives 26.7 GFLOP for scg-gcn on a 448×448 window.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import BACKBONES, count_parameters, create_model, list_models


def measure(name: str, window: int, classes: int, backbone: str, repeats: int) -> dict:
    """Parameters, backbone/head GFLOP and median eval forward seconds of one variant."""
    model = create_model(name, classes, 3, backbone=backbone).eval()
    x = torch.rand(1, 3, window, window)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(x)
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    flops = {module: sum(counts.values()) for module, counts in counter.get_flop_counts().items()}
    return {
        "name": name,
        "params": count_parameters(model),
        "gflop": flops["Global"] / 1e9,
        "head": flops.get("SCGNet.head", 0) / 1e9,
        "seconds": sorted(times[1:])[len(times[1:]) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=448)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--backbone", choices=list(BACKBONES), default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.backbone}, 3 bands, {args.classes} classes, {args.window}x{args.window}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'variant':16} {'params':>11} {'GFLOP':>7} {'head':>6} {'fwd s':>6}")
    for name in list_models():
        row = measure(name, args.window, args.classes, args.backbone, args.repeats)
        print(
            f"{row['name']:16} {row['params']:>11,} {row['gflop']:7.2f} {row['head']:6.2f} "
            f"{row['seconds']:6.2f}"
        )


if __name__ == "__main__":
    main()
