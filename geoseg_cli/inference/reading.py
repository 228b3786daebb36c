"""Reading the input raster for predict: row bands, region spans, valid masks."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg_cli.faults import read_errors
from geoseg_cli.inference.plan import Plan
from geoseg_cli.inference.shared import RegionReader
from geoseg_cli.inference.windows import reflect_indices
from geoseg_cli.raster import nodata_valid, read_masked

#: A GDAL dataset is not thread-safe: the read-ahead thread and the shared engine's reads
#: take turns.
_READ_LOCK = threading.Lock()


def region_reader(src: rasterio.DatasetReader, plan: Plan) -> RegionReader:
    """Reads scaled bands over region pixel spans, reflect-padded past the raster edges."""
    top, left = int(plan.region.row_off), int(plan.region.col_off)

    def read(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        row_idx = reflect_indices(top + rows[0], top + rows[1], src.height)
        col_idx = reflect_indices(left + cols[0], left + cols[1], src.width)
        r0, c0 = int(row_idx.min()), int(col_idx.min())
        window = Window(c0, r0, int(col_idx.max()) + 1 - c0, int(row_idx.max()) + 1 - r0)
        with _READ_LOCK, read_errors(src):
            data = src.read(list(plan.bands), window=window)
        return plan.model_input(data[:, row_idx - r0][:, :, col_idx - c0])

    return read


def read_valid(
    src: rasterio.DatasetReader, plan: Plan, window: Window
) -> tuple[np.ndarray, np.ndarray]:
    """Raw bands and valid mask over ``window`` (by the plan's nodata rule)."""
    with _READ_LOCK:
        if plan.nodata is None:
            return read_masked(src, window, list(plan.bands))
        with read_errors(src):
            data = src.read(list(plan.bands), window=window)
    return data, nodata_valid(data, plan.nodata)


def band_loader(
    src: rasterio.DatasetReader, plan: Plan, needs_band: bool
) -> Callable[[int], tuple[np.ndarray | None, np.ndarray, list[int]]]:
    """``load(b)`` of row band ``b``: its scaled pixels, valid mask and windows to predict.

    The pixels are C×T×(padded width), reflect-padded past the raster edges (None when
    ``needs_band`` is false or no window of the band holds valid pixels); the mask covers
    the band's region rows; the windows are the grid columns holding a valid pixel.
    """
    grid, region = plan.grid, plan.region
    t, height, width = grid.window, grid.height, grid.width
    pad_lo, pad_hi = grid.padded_cols
    col_idx = reflect_indices(region.col_off + pad_lo, region.col_off + pad_hi, src.width)
    read_c0 = int(col_idx.min())
    col_idx -= read_c0
    region_c0 = int(region.col_off) - read_c0

    def load(b: int) -> tuple[np.ndarray | None, np.ndarray, list[int]]:
        r = int(grid.row_starts[b])
        row_idx = reflect_indices(region.row_off + r, region.row_off + r + t, src.height)
        read_r0 = int(row_idx.min())
        read = Window(read_c0, read_r0, int(col_idx.max()) + 1, int(row_idx.max()) + 1 - read_r0)
        data, valid = read_valid(src, plan, read)
        y0, y1 = max(0, r), min(height, r + t)
        band_valid = valid[
            region.row_off + y0 - read_r0 : region.row_off + y1 - read_r0,
            region_c0 : region_c0 + width,
        ]
        has_data = band_valid.any(axis=0)
        kept = [int(c) for c in grid.col_starts if has_data[max(0, c) : c + t].any()]
        band = None
        if kept and needs_band:
            band = plan.model_input(data[:, row_idx - read_r0][:, :, col_idx])
        return band, band_valid, kept

    return load
