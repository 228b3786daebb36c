"""``geoseg demo``: the whole lifecycle on a generated, georeferenced aerial scene."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

from geoseg_cli.checkpoint import ClassInfo
from geoseg_cli.raster import atomic_output

if TYPE_CHECKING:
    from geoseg_cli.train_config import TrainConfig

log = logging.getLogger(__name__)

#: The demo's classes, in class-id order.
DEMO_CLASSES = [
    ClassInfo("road", (128, 128, 128)),
    ClassInfo("building", (200, 60, 40)),
    ClassInfo("tree", (20, 110, 30)),
    ClassInfo("grass", (140, 200, 90)),
    ClassInfo("water", (40, 90, 200)),
]
DEMO_CRS = CRS.from_epsg(32633)
DEMO_PIXEL_SIZE = 0.5
IGNORE_INDEX = 255
ROAD, BUILDING, TREE, GRASS, WATER = range(5)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    rows, cols = shape
    grid = rng.random((rows // cell + 2, cols // cell + 2))
    y = np.arange(rows) / cell
    x = np.arange(cols) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _draw_labels(rng: np.random.Generator, size: int) -> np.ndarray:
    labels = np.full((size, size), GRASS, dtype=np.uint8)
    lake = _smooth_noise(rng, (size, size), max(size // 4, 8)) > 0.72
    labels[lake] = WATER
    # Road grid with irregular spacing.
    for axis in (0, 1):
        pos = int(rng.integers(20, 60))
        while pos < size - 8:
            width = int(rng.integers(6, 12))
            band = (
                (slice(pos, pos + width), slice(None))
                if axis == 0
                else (slice(None), slice(pos, pos + width))
            )
            labels[band] = np.where(labels[band] == WATER, WATER, ROAD)
            pos += width + int(rng.integers(70, 140))
    # Buildings: rectangles on free ground, clear of roads and water.
    for _ in range(size * size // 1200):
        h, w = (int(v) for v in rng.integers(10, 34, size=2))
        r, c = (int(v) for v in rng.integers(0, size - 34, size=2))
        block = labels[r - 3 if r >= 3 else 0 : r + h + 3, c - 3 if c >= 3 else 0 : c + w + 3]
        if np.all(block == GRASS):
            labels[r : r + h, c : c + w] = BUILDING
    # Tree clusters: discs on grass.
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(size * size // 4000):
        cy, cx = (int(v) for v in rng.integers(0, size, size=2))
        for _ in range(int(rng.integers(2, 7))):
            radius = int(rng.integers(4, 10))
            y = cy + int(rng.integers(-12, 13))
            x = cx + int(rng.integers(-12, 13))
            disc = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
            labels[disc & (labels == GRASS)] = TREE
    return labels


def _render(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Paint an RGB uint8 image from a class map, with per-class texture and noise."""
    size = labels.shape[0]
    base = np.array([c.color for c in DEMO_CLASSES], dtype=np.float64)
    image = base[labels].transpose(2, 0, 1)
    fine = rng.normal(0.0, 1.0, size=labels.shape)
    light = _smooth_noise(rng, labels.shape, max(size // 8, 4)) - 0.5
    texture = {
        ROAD: 6 * fine,
        BUILDING: 8 * fine + 30 * (_smooth_noise(rng, labels.shape, 40) - 0.5),
        TREE: 28 * fine + 25 * (_smooth_noise(rng, labels.shape, 3) - 0.5),
        GRASS: 10 * fine,
        WATER: 4 * fine + 12 * np.sin(np.arange(size) / 3.0)[None, :],
    }
    for cls, tex in texture.items():
        mask = labels == cls
        image[:, mask] += tex[mask]
    image += 40 * light
    return np.clip(image, 1, 255).astype(np.uint8)


def make_scene(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate a demo scene.

    The scene is synthetic but shaped like an orthophoto: a road grid, building blocks, tree
    clusters, grass and a lake, with texture and noise, a nodata corner, in UTM (EPSG:32633)
    with 0.5 m pixels. Two scenes are generated from different seeds: one to train on, one as
    the held-out area that is predicted and scored.

    Args:
        size: Width and height in pixels.
        seed: Random seed (the same seed gives the same scene).

    Returns:
        ``(image, labels)``: RGB uint8 ``3×size×size`` with a nodata (0) corner, and uint8
        class ids with :data:`IGNORE_INDEX` under the nodata corner.
    """
    rng = np.random.default_rng(seed)
    labels = _draw_labels(rng, size)
    image = _render(rng, labels)
    corner = np.add.outer(np.arange(size), np.arange(size)) < size // 6
    image[:, corner] = 0
    labels[corner] = IGNORE_INDEX
    return image, labels


def scene_transform(size: int, seed: int) -> Affine:
    """A UTM 33N transform for scene ``seed``: scenes sit side by side, 0.5 m pixels."""
    return from_origin(
        400_000.0 + seed * size * DEMO_PIXEL_SIZE, 5_600_000.0, DEMO_PIXEL_SIZE, DEMO_PIXEL_SIZE
    )


@dataclass
class DemoConfig:
    """Sizes of the demo run (the defaults take a few minutes on 2 CPU cores).

    Attributes:
        outdir: Folder that receives every output.
        size: Width and height of each generated scene in pixels.
        window: Training and prediction window (multiple of 16).
        epochs: Training epochs.
        batch_size: Training batch size.
        lr: Learning rate (higher than the paper's: the demo trains from scratch, briefly).
        loss: Training loss; Dice+CE converges faster than the paper's Dice in a short run.
        backbone: Backbone of the demo model (resnet18 keeps CPU training short).
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: Replace an existing demo folder.
    """

    outdir: Path
    size: int = 1024
    window: int = 128
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    loss: str = "dice+ce"
    backbone: str = "resnet18"
    device: str = "auto"
    overwrite: bool = False

    def train_config(self, chips: Path, output: Path, **changes: Any) -> TrainConfig:
        """The demo's training run on ``chips`` into ``output``, with other settings changed."""
        from geoseg_cli.train_config import TrainConfig

        settings = {
            "backbone": self.backbone,
            "window": self.window,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "loss": self.loss,
            "device": self.device,
            "workers": 0,
            "lr_step_epochs": max(self.epochs, 1),
            "min_epoch_samples": 0,  # an epoch is one pass over the chips
        }
        return TrainConfig(chips_dir=chips, output=output, **{**settings, **changes})


@dataclass
class DemoResult:
    """What the demo produced: paths, scores and timings."""

    outputs: dict[str, Path]
    miou: float
    mf1: float
    oa: float
    onnx_agreement: float
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "held_out": {"miou": self.miou, "mf1": self.mf1, "oa": self.oa},
            "onnx_vs_pytorch_agreement": self.onnx_agreement,
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
        }


def write_scene(folder: Path, name: str, size: int, seed: int) -> tuple[Path, Path]:
    """Write scene ``seed`` as ``<name>.tif`` (RGB, nodata 0) and ``<name>_labels.tif``."""
    image, labels = make_scene(size, seed)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "crs": DEMO_CRS,
        "transform": scene_transform(size, seed),
        "tiled": True,
        "compress": "deflate",
    }
    image_path, label_path = folder / f"{name}.tif", folder / f"{name}_labels.tif"
    with rasterio.open(image_path, "w", count=3, dtype="uint8", nodata=0, **profile) as dst:
        dst.write(image)
    with rasterio.open(
        label_path, "w", count=1, dtype="uint8", nodata=IGNORE_INDEX, **profile
    ) as dst:
        dst.write(labels, 1)
        dst.write_colormap(1, {i: c.color for i, c in enumerate(DEMO_CLASSES)})
    return image_path, label_path


def write_classes(folder: Path) -> Path:
    """Write the demo's classes file, ``folder/classes.json``, and return its path."""
    path = folder / "classes.json"
    table = [{"name": c.name, "color": list(c.color)} for c in DEMO_CLASSES]
    path.write_text(json.dumps({"ignore_index": IGNORE_INDEX, "classes": table}, indent=2))
    return path


def tile_scene(image: Path, labels: Path, classes_file: Path, chips: Path, window: int) -> None:
    """Tile a demo scene as ``geoseg demo`` does: stride ``window/2``, 20 % validation chips."""
    from geoseg_cli.tiling import tile

    tile(
        [str(image)],
        [str(labels)],
        chips,
        size=window,
        stride=window // 2,
        classes=str(classes_file),
        val_fraction=0.2,
        seed=0,
    )


class _Timer:
    """Times named steps and logs each as it starts."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str, message: str) -> Iterator[None]:
        log.info("[%d/7] %s", len(self.timings) + 1, message)
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start


def run_demo(config: DemoConfig) -> DemoResult:
    """Run tile → train → predict --tta → evaluate → export onnx → predict (ONNX).

    Args:
        config: Where and how big.

    Returns:
        Paths, held-out scores, ONNX/PyTorch agreement and timings.
    """
    from geoseg_cli.evaluate import evaluate
    from geoseg_cli.export.onnx import export_onnx
    from geoseg_cli.inference import PredictOptions, load_runtime, predict_raster
    from geoseg_cli.train import train
    from geoseg_cli.train_config import write_config_file

    timer = _Timer()
    final = Path(config.outdir)
    with atomic_output(final, config.overwrite) as out:
        data = out / "data"
        data.mkdir(parents=True)
        with timer.step("scenes", f"generating two {config.size}×{config.size} px scenes"):
            train_image, train_labels = write_scene(data, "scene_train", config.size, 1)
            test_image, test_labels = write_scene(data, "scene_heldout", config.size, 2)
            classes_file = write_classes(data)
        with timer.step("tile", "tiling the training scene"):
            tile_scene(train_image, train_labels, classes_file, out / "chips", config.window)
        with timer.step("train", f"training {config.backbone} scg-gcn for {config.epochs} epochs"):
            train_config = config.train_config(out / "chips", out / "run")
            run = train(train_config)
            # the run's config.toml names where the demo's folders will be, for --resume
            moved = {"chips_dir": final.absolute() / "chips", "output": final.absolute() / "run"}
            write_config_file(replace(train_config, **moved), out / "run" / "config.toml")
        pred = out / "scene_heldout_pred.tif"
        with timer.step("predict", "predicting the held-out scene with flip TTA"):
            runtime = load_runtime(run.best_path, config.device)
            predict_raster(runtime, test_image, pred, PredictOptions(tta="flip", batch_size=8))
        with timer.step("evaluate", "scoring the held-out prediction"):
            metrics = evaluate(pred, test_labels, classes=[c.name for c in DEMO_CLASSES])
            (out / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2))
        onnx_path = out / "model.onnx"
        with timer.step("export", "exporting to ONNX"):
            export_onnx(run.best_path, onnx_path)
        onnx_pred = out / "scene_heldout_pred_onnx.tif"
        with timer.step("predict_onnx", "predicting the held-out scene with ONNX Runtime"):
            predict_raster(
                load_runtime(onnx_path, config.device),
                test_image,
                onnx_pred,
                PredictOptions(tta="flip", batch_size=8),
            )
        agreement = _agreement(pred, onnx_pred)
        quicklook(test_image, test_labels, pred, out / "quicklook.png")
        names = {
            "chips": "chips",
            "run": "run",
            "checkpoint": "run/best.pt",
            "prediction": pred.name,
            "metrics": "metrics.json",
            "onnx": "model.onnx",
            "onnx_prediction": onnx_pred.name,
            "quicklook": "quicklook.png",
            "summary": "summary.json",
        }
        result = DemoResult(
            outputs={k: final / v for k, v in names.items()},
            miou=metrics.miou,
            mf1=metrics.mf1,
            oa=metrics.oa,
            onnx_agreement=agreement,
            timings=timer.timings,
        )
        (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _agreement(a: Path, b: Path) -> float:
    """Fraction of valid pixels where two class maps agree."""
    with rasterio.open(a) as first, rasterio.open(b) as second:
        x, y = first.read(1, masked=True), second.read(1, masked=True)
    valid = ~np.ma.getmaskarray(x) & ~np.ma.getmaskarray(y)
    return float((x.data[valid] == y.data[valid]).mean()) if valid.any() else 0.0


def quicklook(image: Path, labels: Path, prediction: Path, target: Path) -> None:
    """Write a PNG: image | reference labels | prediction, with a class legend.

    Needs matplotlib (``pip install 'geoseg[plot]'``); without it a note is logged.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        log.warning("matplotlib is not installed: no quicklook (pip install 'geoseg[plot]')")
        return
    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[: len(DEMO_CLASSES)] = [c.color for c in DEMO_CLASSES]
    with rasterio.open(image) as src:
        rgb = src.read().transpose(1, 2, 0)
    panels = [("image", rgb)]
    for title, path in (("reference labels", labels), ("prediction", prediction)):
        with rasterio.open(path) as src:
            panels.append((title, colors[src.read(1)]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), constrained_layout=True)
    for ax, (title, array) in zip(axes, panels, strict=True):
        ax.imshow(array, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    handles = [Patch(color=np.array(c.color) / 255, label=c.name) for c in DEMO_CLASSES]
    handles.append(Patch(color="black", label="nodata"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.savefig(target, dpi=80)
    plt.close(fig)
