r"""Training throughput: images/s and peak memory of one optimizer step, fp32 versus AMP.

Runs geoseg's own training step (``forward_loss`` + ``optimizer_step`` from
``geoseg_cli.optim``: Adam/AMSGrad with the paper's parameter groups, Dice + L_kl + L_dl,
poly LR schedule) on random data already on the device, so the numbers measure the model,
not the data pipeline. On CUDA it compares fp32 with AMP (bf16 where supported, else fp16
with loss scaling), both channels_last, and prints their ratio; on CPU it runs fp32 only.

Examples:
    python benchmarks/train_throughput.py                          # scg-gcn, 448 px, batch 8
    python benchmarks/train_throughput.py --backbone resnet18 --window 224 --batch-size 2 \
        --steps 5 --warmup 1                                       # a quick CPU run
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import time
from pathlib import Path

import torch

from geoseg_cli.allocator import keep_freed_memory
from geoseg_cli.distributed import resolve_device
from geoseg_cli.optim import (
    amp_dtype,
    forward_loss,
    make_scheduler,
    optimizer_step,
    parameter_groups,
)
from geoseg_cli.train_config import TrainConfig
from models import SegmentationLoss, count_parameters, create_model


def measure(args: argparse.Namespace, device: torch.device, amp: bool) -> dict[str, float]:
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones."""
    torch.manual_seed(0)
    config = TrainConfig(Path("."), Path("."), variant=args.variant, backbone=args.backbone,
                         window=args.window, epochs=1)  # fmt: skip
    model = create_model(args.variant, args.classes, args.bands, backbone=args.backbone)
    model = model.to(device).train()
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        parameter_groups(model, config.lr, config.weight_decay, config.bias_lr_factor),
        amsgrad=True,
    )
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=args.warmup + args.steps + 1)
    dtype = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = SegmentationLoss("dice").to(device)
    images = torch.randn(args.batch_size, args.bands, args.window, args.window, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch_size, args.window, args.window),
                           device=device)  # fmt: skip

    def step() -> float:
        loss = forward_loss(model, criterion, images, labels, dtype)
        optimizer_step(loss, optimizer, scaler, scheduler)
        return float(loss.detach())  # synchronises the device, as training does

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {
        "precision": str(dtype).removeprefix("torch.") if dtype else "float32",
        "images_per_s": args.batch_size * args.steps / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "peak_gpu_gib": peak,
        "finite": all(math.isfinite(v) for v in losses),
        "parameters": count_parameters(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="scg-gcn")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--window", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--bands", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="Leave glibc's malloc as it is (the geoseg command keeps freed memory for reuse).",
    )
    args = parser.parse_args()
    if not args.glibc_default:
        keep_freed_memory()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"model: {args.variant}/{args.backbone}, {args.bands} bands, {args.classes} classes, "
          f"window {args.window}, batch {args.batch_size}, {args.steps} timed steps")  # fmt: skip
    rows = [measure(args, device, amp=False)]
    if device.type == "cuda":
        rows.append(measure(args, device, amp=True))
    print(f"parameters: {rows[0]['parameters']:,}")
    print(f"{'precision':<10} {'images/s':>9} {'ms/step':>9} {'peak GPU GiB':>13} {'finite':>7}")
    for row in rows:
        print(f"{row['precision']:<10} {row['images_per_s']:9.2f} {row['ms_per_step']:9.1f} "
              f"{row['peak_gpu_gib']:13.2f} {row['finite']!s:>7}")  # fmt: skip
    if len(rows) == 2:
        print(f"AMP speed-up: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x, "
              f"memory ratio: {rows[1]['peak_gpu_gib'] / rows[0]['peak_gpu_gib']:.2f}")  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak host RSS: {rss:.2f} GiB")


if __name__ == "__main__":
    main()
