"""Shared fixtures: tiny synthetic georeferenced rasters (odd sizes, real CRS, nodata).

Nothing here reads ``../shared``: every test builds its own data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

#: UTM zone 18N, 0.5 m pixels, an origin in New York State.
UTM_CRS = CRS.from_epsg(32618)
UTM_TRANSFORM = from_origin(583_000.0, 4_507_000.0, 0.5, 0.5)

#: An Albers CRS known only as WKT (no EPSG code), as in many agency products.
ALBERS_WKT = (
    'PROJCS["unnamed_albers",GEOGCS["NAD83",DATUM["North_American_Datum_1983",'
    'SPHEROID["GRS 1980",6378137,298.257222101]],PRIMEM["Greenwich",0],'
    'UNIT["degree",0.0174532925199433]],PROJECTION["Albers_Conic_Equal_Area"],'
    'PARAMETER["latitude_of_center",23],PARAMETER["longitude_of_center",-96],'
    'PARAMETER["standard_parallel_1",29.5],PARAMETER["standard_parallel_2",45.5],'
    'PARAMETER["false_easting",0],PARAMETER["false_northing",0],UNIT["metre",1]]'
)


#: ``geoseg train`` arguments for a run that takes seconds on a CPU.
TINY_TRAIN = ["--backbone", "resnet18", "--window", "32", "--workers", "0", "--device", "cpu"]
TINY_TRAIN += ["--recipe", "paper"]  # one pass over the chips per epoch


def write_raster(
    path: Path,
    array: np.ndarray,
    crs: CRS | str | None = UTM_CRS,
    transform: Affine = UTM_TRANSFORM,
    nodata: float | None = None,
    colormap: dict[int, tuple[int, int, int]] | None = None,
) -> Path:
    """Write a (bands, rows, cols) or (rows, cols) array as a GeoTIFF and return its path."""
    array = array[np.newaxis] if array.ndim == 2 else array
    profile = {
        "driver": "GTiff",
        "width": array.shape[2],
        "height": array.shape[1],
        "count": array.shape[0],
        "dtype": array.dtype,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        if colormap:
            dst.write_colormap(1, colormap)
    return path


def synthetic_scene(
    height: int, width: int, num_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A learnable scene.

    Blocky class map and a 3-band uint8 image whose colour and texture depend on the class.

    Returns:
        (image uint8 3×H×W, labels uint8 H×W).

    """
    rng = np.random.default_rng(seed)
    cell = 8
    coarse = rng.integers(0, num_classes, size=(-(-height // cell), -(-width // cell)))
    labels = np.kron(coarse, np.ones((cell, cell), dtype=np.int64))[:height, :width]
    palette = rng.integers(30, 225, size=(num_classes, 3))
    image = palette[labels].transpose(2, 0, 1).astype(np.float64)
    image += rng.normal(0, 12, size=image.shape) * (1 + labels % 2)
    return np.clip(image, 0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Results are thread-count specific, and a busy 2-core machine runs small models many times
    faster on one thread than on two.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_raster("name.tif", array, crs=..., transform=..., nodata=...)``."""

    def _make(name: str, array: np.ndarray, **kwargs) -> Path:
        return write_raster(tmp_path / name, array, **kwargs)

    return _make


@pytest.fixture
def nodata_scene(make_raster) -> Path:
    """An odd-sized 3-band uint8 scene with a nodata corner (whole windows) and a nodata row."""
    image, _ = synthetic_scene(83, 117, seed=4)
    image = np.maximum(image, 1)
    image[:, :40, :50] = 0
    image[:, 60:64, :] = 0
    return make_raster("scene.tif", image, nodata=0)


@pytest.fixture
def scene(tmp_path: Path) -> dict[str, Path]:
    """An odd-sized (67×93) 3-band uint8 UTM scene with a nodata corner, and its labels."""
    image, labels = synthetic_scene(67, 93)
    image[:, :10, :12] = 0
    return {
        "image": write_raster(tmp_path / "scene.tif", image, nodata=0),
        "labels": write_raster(tmp_path / "scene_labels.tif", labels),
    }


def coarse_scene(
    height: int, width: int, num_classes: int = 3, factor: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`synthetic_scene` enlarged ``factor`` times (class cells of 8·factor px).

    A stride-16 network can resolve its classes.

    Returns:
        (image uint8 3×H×W, labels uint8 H×W).
    """
    image, labels = synthetic_scene(-(-height // factor), -(-width // factor), num_classes, seed)
    image = image.repeat(factor, axis=1).repeat(factor, axis=2)[:, :height, :width]
    labels = labels.repeat(factor, axis=0).repeat(factor, axis=1)[:height, :width]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def write_chips(
    root: Path,
    image: np.ndarray,
    labels: np.ndarray,
    size: int,
    class_names: list[str] | None = None,
    ignore_index: int = 255,
    val_every: int = 4,
) -> Path:
    """Write a CHIPS_DIR as ``geoseg tile`` does (images/, labels/, manifest.csv, stats.json).

    Cuts (image, labels) on a non-overlapping grid of ``size`` px chips; every
    ``val_every``-th chip goes to the val split. Independent of geoseg's own tiling code.
    """
    import csv
    import json

    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    num_classes = len(class_names) if class_names else int(labels[labels != ignore_index].max()) + 1
    names = class_names or [f"class_{i}" for i in range(num_classes)]
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows, train_pixels, counts = [], [], np.zeros(num_classes, dtype=np.int64)
    for index, (top, left) in enumerate(
        (t, c)
        for t in range(0, labels.shape[0] - size + 1, size)
        for c in range(0, labels.shape[1] - size + 1, size)
    ):
        chip_id = f"scene_{left}_{top}"
        transform = window_transform(Window(left, top, size, size), UTM_TRANSFORM)
        chip_image = image[:, top : top + size, left : left + size]
        chip_labels = labels[top : top + size, left : left + size]
        write_raster(root / "images" / f"{chip_id}.tif", chip_image, transform=transform)
        write_raster(root / "labels" / f"{chip_id}.tif", chip_labels, transform=transform)
        split = "val" if index % val_every == val_every - 1 else "train"
        valid = chip_labels[chip_labels != ignore_index]
        chip_counts = np.bincount(valid, minlength=num_classes)
        if split == "train":
            train_pixels.append(chip_image.reshape(image.shape[0], -1) / 255.0)
            counts += chip_counts
        rows.append(
            [chip_id, f"images/{chip_id}.tif", f"labels/{chip_id}.tif", "scene.tif", left, top,
             size, size, split, 1 - valid.size / chip_labels.size, *chip_counts.tolist()]
        )  # fmt: skip
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["chip_id", "image", "label", "source", "col_off", "row_off", "width", "height",
             "split", "nodata_fraction", *(f"count_{n}" for n in names)]
        )  # fmt: skip
        writer.writerows(rows)
    pixels = np.concatenate(train_pixels, axis=1)
    freq = counts / counts.sum()
    weights = np.where(freq > 0, np.median(freq[freq > 0]) / np.maximum(freq, 1e-12), 0.0)
    stats = {
        "format_version": 1,
        "bands": list(range(1, image.shape[0] + 1)),
        "dtype": str(image.dtype),
        "scale": 1 / 255,
        "mean": pixels.mean(axis=1).tolist(),
        "std": pixels.std(axis=1).tolist(),
        "nodata": None,
        "resolution": 0.5,
        "crs": UTM_CRS.to_wkt(),
        "classes": [{"name": n, "color": [40 * i, 255 - 40 * i, 128]} for i, n in enumerate(names)],
        "ignore_index": ignore_index,
        "class_counts": counts.tolist(),
        "class_frequencies": freq.tolist(),
        "class_weights": weights.tolist(),
        "size": size,
        "stride": size,
        "num_chips": {
            "train": sum(r[8] == "train" for r in rows),
            "val": sum(r[8] == "val" for r in rows),
        },
    }
    (root / "stats.json").write_text(json.dumps(stats, indent=2))
    return root


@pytest.fixture
def chips(tmp_path: Path) -> Path:
    """A small CHIPS_DIR.

    A 3-class 256×256 textured scene cut into 16 chips of 64 px (12 train, 4 val), with a few
    unlabelled (ignore) pixels.
    """
    image, labels = coarse_scene(256, 256, num_classes=3, seed=3)
    labels[:5, :7] = 255
    return write_chips(tmp_path / "chips", image, labels, 64)


def write_geojson(path: Path, features: list[tuple[dict, dict]], crs: str | None = None) -> Path:
    """Write (geometry, properties) pairs as a GeoJSON FeatureCollection.

    Args:
        path: The file to write.
        features: (GeoJSON geometry, properties) pairs.
        crs: Legacy ``crs`` member name (e.g. ``"urn:ogc:def:crs:EPSG::4326"``); None omits it.
    """
    import json

    doc: dict = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": geom, "properties": props} for geom, props in features
        ],
    }
    if crs is not None:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def save_tiny_checkpoint(
    path: Path,
    num_classes: int = 3,
    in_channels: int = 3,
    dtype: str = "uint8",
    window: int = 32,
    seed: int = 0,
    variant: str = "scg-gcn",
) -> Path:
    """Save an untrained model (``variant``, resnet18 backbone) as a geoseg checkpoint.

    Input scaling follows ``dtype`` (1/255 for uint8, 1/10000 otherwise); classes are named
    ``class_0``… with distinct colours.
    """
    import torch

    from geoseg_cli.checkpoint import (
        Checkpoint,
        ClassInfo,
        InputSpec,
        ModelSpec,
        save_checkpoint,
    )
    from models import create_model

    torch.manual_seed(seed)
    model = create_model(variant, num_classes, in_channels, backbone="resnet18")
    ckpt = Checkpoint(
        model=ModelSpec(variant, "resnet18", num_classes, in_channels),
        classes=[
            ClassInfo(f"class_{i}", (40 * i % 256, 255 - 40 * i % 256, 128))
            for i in range(num_classes)
        ],
        ignore_index=255,
        input=InputSpec(
            bands=list(range(1, in_channels + 1)),
            dtype=dtype,
            scale=1 / 255 if dtype == "uint8" else 1 / 10000,
            mean=[0.45] * in_channels,
            std=[0.25] * in_channels,
        ),
        window=window,
        state_dict=model.state_dict(),
    )
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-class, 3-band uint8 SCG-Net checkpoint (resnet18, window 32)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
