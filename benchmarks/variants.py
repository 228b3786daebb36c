"""The graph heads side by side: size, cost and what they learn on the demo scene.

For scg-gcn, mscg-gcn, cdgc and cdgc without dynamic sampling (the ablation), on one
backbone: parameters (3 bands, the demo's 5 classes), GFLOP per 448×448 window (counted by
``torch.utils.flop_counter`` as in ``benchmarks/model_cost.py``: convolutions and matrix
products, 2 per multiply-add), CPU milliseconds per 448×448 window (eval, batch 1, median of
``--repeats`` runs, the variants interleaved run by run), then each trained on the same
demo scene chips (``geoseg_cli.demo``: scene 1, tiled as ``geoseg demo`` tiles it) for the
same epochs (by default ``geoseg demo``'s run: 1024² scene, 128-px windows, 30 epochs,
Dice + CE for the SCG heads), with its training seconds and the mIoU of its flip-TTA
prediction of the held-out scene 2.

Example:
    nice -n 5 python benchmarks/variants.py
    python benchmarks/variants.py --no-train --backbone resnet50   # sizes and costs only
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from geoseg_cli.demo import DEMO_CLASSES, DemoConfig, tile_scene, write_classes, write_scene
from geoseg_cli.evaluate import evaluate
from geoseg_cli.inference import PredictOptions, load_runtime, predict_raster
from geoseg_cli.train import train
from models import BACKBONES, count_parameters, create_model

#: (label, variant, model options) of the rows.
ROWS = [
    ("scg-gcn", "scg-gcn", {}),
    ("mscg-gcn", "mscg-gcn", {}),
    ("cdgc", "cdgc", {}),
    ("cdgc, no dynamic sampling", "cdgc", {"dynamic_sampling": False}),
]
COST_WINDOW = 448
#: ``geoseg demo``'s sizes: the defaults of the training runs.
DEMO = DemoConfig(Path("."))


def cost(variant: str, options: dict, backbone: str) -> tuple[torch.nn.Module, int, float]:
    """The eval model, its parameters and GFLOP per 448² window."""
    torch.manual_seed(0)
    model = create_model(variant, len(DEMO_CLASSES), 3, backbone=backbone, **options).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, COST_WINDOW, COST_WINDOW))
    return model, count_parameters(model), counter.get_total_flops() / 1e9


def cpu_ms(models: list[torch.nn.Module], repeats: int) -> list[float]:
    """Median eval forward milliseconds per 448² window, the models run in turn."""
    x = torch.rand(1, 3, COST_WINDOW, COST_WINDOW)
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:  # warm-up
            model(x)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(x)
                times[i].append(1000 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times]


def prepare_data(root: Path, size: int, window: int) -> tuple[Path, Path, Path]:
    """Scenes 1 (train) and 2 (held out) and the chips of scene 1, as ``geoseg demo``."""
    data = root / "data"
    data.mkdir()
    train_image, train_labels = write_scene(data, "scene_train", size, 1)
    test_image, test_labels = write_scene(data, "scene_heldout", size, 2)
    tile_scene(train_image, train_labels, write_classes(data), root / "chips", window)
    return root / "chips", test_image, test_labels


def train_and_score(
    root: Path, chips: Path, image: Path, labels: Path, row: tuple, args: argparse.Namespace
) -> tuple[float, float]:
    """Training seconds and held-out mIoU of one row."""
    label, variant, options = row
    run = root / label.replace(" ", "_").replace(",", "")
    demo = dataclasses.replace(
        DEMO,
        backbone=args.backbone,
        window=args.window,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device="cpu",
    )
    config = demo.train_config(chips, run, variant=variant, seed=args.seed, model_options=options)
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    prediction = run / "heldout.tif"
    runtime = load_runtime(result.best_path, "cpu")
    predict_raster(runtime, image, prediction, PredictOptions(tta="flip", batch_size=8))
    metrics = evaluate(prediction, labels, classes=[c.name for c in DEMO_CLASSES])
    return seconds, metrics.miou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=list(BACKBONES), default=DEMO.backbone)
    parser.add_argument("--size", type=int, default=DEMO.size, help="demo scene side (px)")
    parser.add_argument("--window", type=int, default=DEMO.window, help="training window")
    parser.add_argument("--epochs", type=int, default=DEMO.epochs)
    parser.add_argument("--batch-size", type=int, default=DEMO.batch_size)
    parser.add_argument("--lr", type=float, default=DEMO.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (on a busy machine 1 is faster)"
    )
    parser.add_argument("--no-train", action="store_true", help="sizes and costs only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    costs = [cost(variant, options, args.backbone) for _, variant, options in ROWS]
    milliseconds = cpu_ms([model for model, _, _ in costs], args.repeats)
    trained: list[tuple[float, float] | None] = [None] * len(ROWS)
    if not args.no_train:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            chips, image, labels = prepare_data(root, args.size, args.window)
            for i, row in enumerate(ROWS):
                trained[i] = train_and_score(root, chips, image, labels, row, args)
                print(
                    f"# {row[0]}: {trained[i][0]:.0f} s, held-out mIoU {trained[i][1]:.4f}",
                    flush=True,
                )

    print(
        f"\n{args.backbone}, 3 bands, {len(DEMO_CLASSES)} classes; {platform.processor() or 'CPU'}"
        f", {torch.get_num_threads()} threads; training: {args.size}² demo scene, window "
        f"{args.window}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed "
        f"{args.seed}; held-out: scene 2, flip TTA\n"
    )
    print("| variant | params | GFLOP / 448² | CPU ms / 448² | train s | held-out mIoU |")
    print("|---|---|---|---|---|---|")
    for (label, _, _), (_, params, gflop), ms, result in zip(
        ROWS, costs, milliseconds, trained, strict=True
    ):
        seconds, miou = (f"{result[0]:.0f}", f"{result[1]:.4f}") if result else ("-", "-")
        print(f"| {label} | {params:,} | {gflop:.2f} | {ms:.0f} | {seconds} | {miou} |")


if __name__ == "__main__":
    main()
