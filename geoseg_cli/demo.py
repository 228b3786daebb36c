"""``geoseg demo``: the whole lifecycle on a generated, georeferenced aerial scene.

The scene is synthetic but shaped like an orthophoto: a road grid, building blocks, tree
clusters, grass and a lake, with texture and noise, a nodata corner, in UTM (EPSG:32633)
with 0.5 m pixels. Two scenes are generated from different seeds: one to train on, one as
the held-out area that is predicted and scored.
"""

from __future__ import annotations

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import from_origin

from geoseg_cli.checkpoint import ClassInfo

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
            band = (slice(pos, pos + width), slice(None)) if axis == 0 else (
                slice(None), slice(pos, pos + width))
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


def scene_transform(size: int, seed: int):
    """A UTM 33N transform for scene ``seed``: scenes sit side by side, 0.5 m pixels."""
    return from_origin(400_000.0 + seed * size * DEMO_PIXEL_SIZE, 5_600_000.0,
                       DEMO_PIXEL_SIZE, DEMO_PIXEL_SIZE)
