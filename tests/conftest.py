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
    """A learnable scene: blocky class map and a 3-band uint8 image whose colour and
    texture depend on the class.

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


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_raster("name.tif", array, crs=..., transform=..., nodata=...)``."""

    def _make(name: str, array: np.ndarray, **kwargs) -> Path:
        return write_raster(tmp_path / name, array, **kwargs)

    return _make


@pytest.fixture
def scene(tmp_path: Path) -> dict[str, Path]:
    """An odd-sized (67×93) 3-band uint8 UTM scene with a nodata corner, and its labels."""
    image, labels = synthetic_scene(67, 93)
    image[:, :10, :12] = 0
    return {
        "image": write_raster(tmp_path / "scene.tif", image, nodata=0),
        "labels": write_raster(tmp_path / "scene_labels.tif", labels),
    }
