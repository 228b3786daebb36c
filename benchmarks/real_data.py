"""Held-out scores on real imagery: tile a training part, train, predict a separate part.

Each dataset is split into two spatially separate parts: a band along the left edge
(``--holdout`` of the width) that neither training nor validation chips touch, a gap of
``--gap`` pixels, and the rest, which is tiled (``--size`` chips every ``--stride`` pixels)
and trained on. The held-out band is then predicted with ``best.pt`` and scored with
``geoseg evaluate``: IoU, precision and recall of the positive class (building) and mIoU
over all classes. Each dataset also gets the held-out IoU that the model's output can
represent at best: a grid of one logit per ``models.OUTPUT_STRIDE`` pixels, bilinearly
upsampled as scg-gcn does, fitted to the held-out labels themselves.

Datasets:
    spacenet  ``../shared/data/spacenet/sample_geotiff.tif`` (900×900 WorldView pan, uint16,
              0.5 m) with ``geotiff_labels.geojson`` (building footprints → background,
              building).
    demo      a generated ``geoseg demo`` scene (RGB uint8, 0.5 m, 5 classes, nodata corner).

Runs are ``DATASET:RECIPE[:KEY=VALUE,...]`` (recipe ``paper`` or ``scratch``; keys are
``geoseg train`` settings, e.g. ``lr=1e-3``); no run uses pretrained weights. Runs go one
after the other in one process, so compare them within one invocation.

Examples:
    python benchmarks/real_data.py --runs spacenet:paper spacenet:scratch --markdown
    python benchmarks/real_data.py --runs spacenet:scratch:epochs=2 --work /tmp/rd
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg_cli.demo import BUILDING, DEMO_CLASSES, IGNORE_INDEX, write_scene
from geoseg_cli.evaluate import evaluate
from geoseg_cli.inference import PredictOptions, load_runtime, predict_raster
from geoseg_cli.labels import open_labels, resolve_classes
from geoseg_cli.metrics import ConfusionMatrix
from geoseg_cli.pretrain import PretrainConfig, pretrain
from geoseg_cli.tiling import tile
from geoseg_cli.train import train
from geoseg_cli.train_config import TrainConfig
from models import OUTPUT_STRIDE

SPACENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "spacenet"
#: Settings every run shares unless a run overrides them (a CPU-sized model and window).
COMMON = {"backbone": "resnet18", "window": 128, "workers": 0, "device": "cpu"}


@dataclass
class Dataset:
    """One image split into a training part and a held-out band."""

    name: str
    train_image: Path
    train_labels: Path
    heldout_image: Path
    heldout_labels: Path
    classes: str | None
    positive: int
    positive_name: str


def crop(source: Path, target: Path, window: Window, zoom: int = 1, labels: bool = False) -> None:
    """Copy ``window`` of ``source`` to a GeoTIFF with the window's transform.

    The copy is resampled to ``zoom`` times finer pixels (bilinear; nearest for ``labels``).
    """
    with rasterio.open(source) as src:
        profile = src.profile | {
            "width": int(window.width) * zoom,
            "height": int(window.height) * zoom,
            "transform": window_transform(window, src.transform) * Affine.scale(1 / zoom),
            "driver": "GTiff",
            "tiled": False,
            "compress": "deflate",
        }
        profile.pop("blockxsize", None)
        profile.pop("blockysize", None)
        shape = (src.count, int(window.height) * zoom, int(window.width) * zoom)
        method = Resampling.nearest if labels else Resampling.bilinear
        data = src.read(window=window, out_shape=shape, resampling=method)
        colormap = None
        if src.count == 1 and src.dtypes[0] == "uint8":
            try:
                colormap = src.colormap(1)
            except ValueError:
                colormap = None
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)
        if colormap:
            dst.write_colormap(1, colormap)


def split_parts(image: Path, holdout: float, gap: int) -> tuple[Window, Window]:
    """Windows of the held-out left band and of the training part right of the gap."""
    with rasterio.open(image) as src:
        width, height = src.width, src.height
    band = round(holdout * width)
    return Window(0, 0, band, height), Window(band + gap, 0, width - band - gap, height)


def prepare(name: str, work: Path, args: argparse.Namespace) -> Dataset:
    """Write the two parts of dataset ``name`` under ``work``."""
    folder = work / (name if args.zoom == 1 else f"{name}_x{args.zoom}")
    folder.mkdir(parents=True, exist_ok=True)
    if name == "spacenet":
        image = SPACENET / "sample_geotiff.tif"
        labels = SPACENET / "geotiff_labels.geojson"
        heldout, trainpart = split_parts(image, args.holdout, args.gap)
        crop(image, folder / "train.tif", trainpart, args.zoom)
        crop(image, folder / "heldout.tif", heldout, args.zoom)
        return Dataset(
            name, folder / "train.tif", labels, folder / "heldout.tif", labels, None, 1, "building"
        )
    image, labels = write_scene(folder, "scene", args.demo_size, seed=1)
    heldout, trainpart = split_parts(image, args.holdout, args.gap)
    for part, window in (("train", trainpart), ("heldout", heldout)):
        crop(image, folder / f"{part}.tif", window, args.zoom)
        crop(labels, folder / f"{part}_labels.tif", window, args.zoom, labels=True)
    classes = folder / "classes.json"
    classes.write_text(
        json.dumps(
            {
                "ignore_index": IGNORE_INDEX,
                "classes": [{"name": c.name, "color": list(c.color)} for c in DEMO_CLASSES],
            }
        )
    )
    return Dataset(
        name,
        folder / "train.tif",
        folder / "train_labels.tif",
        folder / "heldout.tif",
        folder / "heldout_labels.tif",
        str(classes),
        BUILDING,
        "building",
    )


def heldout_mask(data: Dataset) -> np.ndarray:
    """The held-out labels as class ids on the held-out image's grid."""
    source = open_labels(str(data.heldout_labels))
    table = resolve_classes([source], data.classes, IGNORE_INDEX)
    with rasterio.open(data.heldout_image) as image, source.reader(table, image) as read:
        return read(Window(0, 0, image.width, image.height))


def stride_ceiling(labels: np.ndarray, positive: int, steps: int = 300) -> float:
    """Positive-class IoU of the logit grid at the output stride that best fits ``labels``.

    One logit per ``OUTPUT_STRIDE`` × ``OUTPUT_STRIDE`` cell is fitted (Adam on binary
    cross-entropy, ignore pixels left out) so that its bilinear upsampling matches the
    positive-class mask: what a head that upsamples stride-16 logits can represent.
    """
    height, width = (n - n % OUTPUT_STRIDE for n in labels.shape)
    cut = labels[:height, :width]
    target = torch.from_numpy(cut == positive).float()[None, None]
    weight = torch.from_numpy(cut != IGNORE_INDEX).float()[None, None]
    logits = torch.zeros(1, 1, height // OUTPUT_STRIDE, width // OUTPUT_STRIDE, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.5)
    for _ in range(steps):
        up = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        loss = F.binary_cross_entropy_with_logits(up, target, weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    matrix = ConfusionMatrix(2, IGNORE_INDEX)
    matrix.update(
        (up.detach() > 0)[0, 0], np.where(cut == IGNORE_INDEX, IGNORE_INDEX, cut == positive)
    )
    return float(matrix.metrics().iou[1])


def parse_run(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``DATASET:RECIPE[:KEY=VALUE,...]`` → dataset, recipe, overrides (JSON values)."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] not in ("spacenet", "demo"):
        raise SystemExit(f"bad run {spec!r}; expected DATASET:RECIPE[:KEY=VALUE,...]")
    overrides: dict[str, Any] = {}
    for item in filter(None, (parts[2] if len(parts) == 3 else "").split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return parts[0], parts[1], overrides


def run_one(
    data: Dataset,
    recipe: str,
    overrides: dict[str, Any],
    work: Path,
    args: argparse.Namespace,
    index: int,
) -> dict[str, Any]:
    """Tile, train, predict and score one run; return its row."""
    run_dir = work / f"run{index}_{data.name}_{recipe}_x{args.zoom}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    tile_args = {
        k.removeprefix("tile_"): overrides.pop(k) for k in list(overrides) if k.startswith("tile_")
    }
    summary = tile(
        [str(data.train_image)],
        [str(data.train_labels)],
        run_dir / "chips",
        classes=data.classes,
        seed=0,
        **{"size": args.size, "stride": args.stride, **tile_args},
    )
    pretrain_steps = overrides.pop("pretrain_steps", 0)
    settings = {**COMMON, "recipe": recipe, "epochs": 1, **overrides}
    if pretrain_steps:  # self-supervised on both parts' pixels (no labels)
        weights = run_dir / "ssl.pt"
        pretrain(
            PretrainConfig(
                [str(data.train_image), str(data.heldout_image)],
                weights,
                backbone=settings["backbone"],
                window=settings["window"],
                steps=pretrain_steps,
                batch_size=8,
                device="cpu",
            )
        )
        settings["backbone_weights"] = weights
    config = TrainConfig.from_dict(
        {"chips_dir": run_dir / "chips", "output": run_dir / "run", **settings}, "benchmark"
    )
    if "epochs" not in overrides:  # as many epochs as make about --steps optimizer steps
        samples = max(summary.num_chips["train"], config.min_epoch_samples)
        config.epochs = max(1, round(args.steps / math.ceil(samples / config.batch_size)))
    result = train(config)
    trained = time.perf_counter()
    pred = run_dir / "heldout_pred.tif"
    predict_raster(
        load_runtime(result.best_path, "cpu"),
        data.heldout_image,
        pred,
        PredictOptions(batch_size=8),
    )
    metrics = evaluate(
        pred, data.heldout_labels, num_classes=len(_classes(data)), ignore_index=IGNORE_INDEX
    )
    finished, cpu = time.perf_counter(), time.process_time() - cpu_started
    return {
        "dataset": data.name,
        "recipe": recipe,
        "changes": ",".join(
            f"{k}={v}"
            for k, v in {**tile_args, **overrides, "pretrain_steps": pretrain_steps}.items()
            if k != "pretrain_steps" or v
        )
        or "-",
        "iou": float(metrics.iou[data.positive]),
        "precision": float(metrics.precision[data.positive]),
        "recall": float(metrics.recall[data.positive]),
        "miou": metrics.miou,
        "val_best": result.best_value,
        "best_epoch": result.best_epoch,
        "steps": result.step,
        "train_min": (trained - started) / 60,
        "total_min": (finished - started) / 60,
        "cpu_min": cpu / 60,
    }


def _classes(data: Dataset) -> list[str]:
    return ["background", "building"] if data.name == "spacenet" else [c.name for c in DEMO_CLASSES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["spacenet:paper", "spacenet:scratch"])
    parser.add_argument(
        "--steps", type=int, default=3000, help="Optimizer steps unless a run sets epochs."
    )
    parser.add_argument("--size", type=int, default=128, help="Chip size of geoseg tile.")
    parser.add_argument("--stride", type=int, default=64, help="Chip stride of geoseg tile.")
    parser.add_argument("--holdout", type=float, default=0.25, help="Held-out share of width.")
    parser.add_argument("--gap", type=int, default=32, help="Pixels between the two parts.")
    parser.add_argument(
        "--zoom", type=int, default=1, help="Resample both parts to N times finer pixels."
    )
    parser.add_argument("--demo-size", type=int, default=768, help="Demo scene size.")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: temp).")
    parser.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 collapse on a busy 2-core VM)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log training progress.")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("rasterio").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="geoseg-real-"))
    print(f"machine: {platform.processor() or platform.machine()}, work folder {work}")
    datasets: dict[str, Dataset] = {}
    rows = []
    for index, spec in enumerate(args.runs):
        name, recipe, overrides = parse_run(spec)
        if name not in datasets:
            datasets[name] = data = prepare(name, work, args)
            ceiling = stride_ceiling(heldout_mask(data), data.positive)
            print(
                f"{name}: a stride-{OUTPUT_STRIDE} logit grid fitted to the held-out labels "
                f"reaches {data.positive_name} IoU {ceiling:.3f}",
                flush=True,
            )
        rows.append(run_one(datasets[name], recipe, overrides, work, args, index))
        row = rows[-1]
        print(
            f"{spec}: {row['dataset']} IoU {row['iou']:.3f} (precision {row['precision']:.3f}, "
            f"recall {row['recall']:.3f}) mIoU {row['miou']:.3f} "
            f"(val best {row['val_best']:.3f} @ epoch {row['best_epoch']}, {row['steps']} "
            f"steps) {row['total_min']:.1f} min, CPU {row['cpu_min']:.1f} min",
            flush=True,
        )
    header = [
        "dataset",
        "recipe",
        "changes",
        "held-out IoU (building)",
        "precision / recall",
        "held-out mIoU",
        "val mIoU",
        "steps",
        "minutes",
    ]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row["dataset"],
                row["recipe"],
                row["changes"],
                f"{row['iou']:.3f}",
                f"{row['precision']:.2f} / {row['recall']:.2f}",
                f"{row['miou']:.3f}",
                f"{row['val_best']:.3f}",
                str(row["steps"]),
                f"{row['total_min']:.1f}",
            ]
        )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
