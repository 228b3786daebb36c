"""What a prediction run will do, fixed and checked before it starts: options, grid, bands."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg_cli.checkpoint import ModelInfo
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.inference.tta import View, tta_views
from geoseg_cli.inference.windows import Grid
from geoseg_cli.raster import bounds_window, has_mask

log = logging.getLogger(__name__)

#: Inference methods: ``window`` runs the whole network on every window (the paper's),
#: ``shared`` the backbone once per pixel and view and only the head per window.
ENGINES = ("window", "shared")
#: Encodings of ``--probabilities``: uint8 is round(255·p), float32 is p.
PROBABILITY_DTYPES = ("uint8", "float32")
#: Rows per block assumed by the memory estimate (the default output tile height).
_BLOCK_ROWS = 512


@dataclass
class PredictOptions:
    """How to predict one raster (the flags of ``geoseg predict``).

    Attributes:
        window: Window size T (default: the model's training window).
        stride: Stride S, 1..T (default: T // 2). Overlap is T - S.
        tta: None, ``"flip"`` (identity + horizontal + vertical flip) or ``"d4"``.
        batch_size: Images (windows × TTA views) per forward pass; with the shared engine,
            per head pass (default: the engine's).
        bands: 1-based source bands in model channel order (default: the model's).
        nodata: Input nodata value overriding the raster's own masks.
        bounds: ``(left, bottom, right, top)`` in the raster CRS: predict only that part.
        probabilities: None or one of :data:`PROBABILITY_DTYPES`: also write per-class
            probabilities to ``<output stem>_probabilities.tif``.
        cog: Write Cloud-Optimized GeoTIFFs (with overviews).
        vector: Also write class polygons to this vector file.
        creation_options: GDAL creation options overriding the defaults.
        overwrite: Replace existing outputs.
        engine: One of :data:`ENGINES`. The shared engine rounds the stride to the feature
            grid and falls back to the window engine when the model cannot split into
            backbone and head, or when windows do not overlap.
        tile: Shared engine: largest backbone tile side in pixels (default: the engine's).
        halo: Shared engine: context around inner tile sides in pixels (default: the
            engine's).
    """

    window: int | None = None
    stride: int | None = None
    tta: str | None = None
    batch_size: int | None = None
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    bounds: tuple[float, float, float, float] | None = None
    probabilities: str | None = None
    cog: bool = False
    vector: Path | None = None
    creation_options: dict[str, str] = field(default_factory=dict)
    overwrite: bool = False
    engine: str = "window"
    tile: int | None = None
    halo: int | None = None

    def check(self) -> None:
        """Refuse option values that no raster or model could make valid.

        Raises:
            UsageError: The first bad option.
        """
        tta_views(self.tta)
        if self.engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.probabilities not in (None, *PROBABILITY_DTYPES):
            raise UsageError(
                f"probabilities type {self.probabilities!r} is not one of "
                f"{', '.join(PROBABILITY_DTYPES)}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")


@dataclass(frozen=True)
class Plan:
    """The engine-independent part of a run: where the windows go and how pixels are read.

    Attributes:
        grid: Window grid over the region.
        region: Part of the source raster that is predicted.
        bands: 1-based source bands read, in model channel order.
        source_dtype: Data type of those bands.
        scale: Factor from raw values to model input.
        nodata: Nodata value deciding valid pixels, or None to use the raster's masks.
        views: TTA views per window.
        num_classes: Model classes.
        probabilities: Probability output type, or None.
        tta: TTA set name, or None.
        fill: Per band, the model input (scaled units) that replaces values that are not
            finite: the training mean, 0 once standardized (empty: 0).
    """

    grid: Grid
    region: Window
    bands: tuple[int, ...]
    source_dtype: str
    scale: float
    nodata: float | None
    views: tuple[View, ...]
    num_classes: int
    probabilities: str | None
    tta: str | None
    fill: tuple[float, ...] = ()

    @property
    def padded_width(self) -> int:
        """Width of a row band, padding included."""
        left, right = self.grid.padded_cols
        return right - left

    def model_input(self, raw: np.ndarray) -> np.ndarray:
        """Scaled float32 model input of raw bands (C×…), with NaN and ±inf filled.

        Such pixels are nodata and never predicted, but a window holding one still feeds it
        to the network, where it would spread over the whole window: it becomes
        :attr:`fill`, a neutral value.
        """
        scaled = np.multiply(raw, self.scale, dtype=np.float32)
        if raw.dtype.kind == "f":
            bad = ~np.isfinite(raw)
            if bad.any():
                fill = np.asarray(self.fill or 0.0, dtype=np.float32)
                fill = np.broadcast_to(fill.reshape(-1, *[1] * (raw.ndim - 1)), raw.shape)
                np.copyto(scaled, fill, where=bad)
        return scaled

    def memory_bytes(self) -> int:
        """Working memory of reading, blending and writing (engines add their own)."""
        g, k, c = self.grid, self.num_classes, len(self.bands)
        raw = np.dtype(self.source_dtype).itemsize
        accumulator = k * g.window * g.width * 4
        band = c * g.window * self.padded_width * (2 * raw + 4) + g.window * self.padded_width
        out_bytes = {None: 0, "uint8": 1, "float32": 4}[self.probabilities]
        writers = _BLOCK_ROWS * g.width * (2 + k * out_bytes)
        return accumulator + band + writers

    def describe(self) -> str:
        """The grid part of the plan log."""
        g = self.grid
        return (
            f"{g.count} windows ({len(g.row_starts)} rows x {len(g.col_starts)} cols) of "
            f"{g.window} px, stride {g.stride}, {len(self.views)} TTA view(s)"
        )


def select_bands(
    src: rasterio.DatasetReader, info: ModelInfo, bands: Sequence[int] | None
) -> tuple[int, ...]:
    """The source bands to read, checked against the model and the raster.

    Raises:
        UsageError: ``-b`` gives another number of bands than the model takes.
        InputError: The raster lacks a band, or its dtype differs from the model's.
    """
    channels = info.model.in_channels
    if bands:
        if len(bands) != channels:
            raise UsageError(f"-b gave {len(bands)} band(s) but the model takes {channels}")
        chosen = tuple(bands)
    else:
        chosen = tuple(info.input.bands)
    if max(chosen) > src.count:
        raise InputError(
            f"{src.name} has {src.count} band(s) but the model reads band(s) {list(chosen)}; "
            f"pick {channels} band(s) with -b"
        )
    check_dtype(src.name, {src.dtypes[b - 1] for b in chosen}, info.input.dtype)
    return chosen


def check_dtype(name: str, source: set[str], model: str) -> None:
    """Refuse bands whose type differs from the training data's.

    The types must be equal, except that any floating-point type fits a floating-point
    model (the scaling is the same). An integer type other than the model's means another
    value range (e.g. 8-bit vs 11-bit), which the checkpoint's scale would get wrong.

    Raises:
        InputError: A band type differs (names the file and the fix).
    """
    for dtype in sorted(source):
        if dtype == model or (
            np.issubdtype(np.dtype(dtype), np.floating)
            and np.issubdtype(np.dtype(model), np.floating)
        ):
            continue
        raise InputError(
            f"{name} has {dtype} bands but the model was trained on {model} rasters; "
            f"convert it to {model} first (e.g. gdal_translate -ot ... -scale) "
            f"or use a model trained on {dtype} data"
        )


def check_window(window: int, stride: int, output_stride: int) -> None:
    """Refuse a window off the model's feature grid or a stride outside 1..window.

    Raises:
        UsageError: Which of the two is wrong.
    """
    if window < output_stride or window % output_stride:
        raise UsageError(f"--window {window} must be a positive multiple of {output_stride}")
    if not 1 <= stride <= window:
        raise UsageError(f"--stride {stride} must be between 1 and the window ({window})")


def make_plan(
    src: rasterio.DatasetReader,
    info: ModelInfo,
    options: PredictOptions,
    window: int,
    stride: int,
    output_stride: int,
) -> Plan:
    """Check the raster against the model and fix the window grid.

    Windows start on the feature grid whenever the stride is on it, so that every engine
    places the same windows.

    Args:
        src: The open input raster.
        info: The model description.
        options: The prediction options (bands, bounds, nodata, TTA, probabilities).
        window: Window size (checked by :func:`check_window`).
        stride: Stride, after any rounding the engine needs.
        output_stride: The model's output stride.

    Raises:
        InputError: The raster does not fit the model (bands, dtype) or the bounds miss it.
    """
    bands = select_bands(src, info, options.bands)
    region = (
        bounds_window(src, options.bounds)
        if options.bounds
        else Window(0, 0, src.width, src.height)
    )
    align = output_stride if stride % output_stride == 0 else 1
    nodata = options.nodata
    if nodata is None and info.input.nodata is not None and not has_mask(src, list(bands)):
        nodata = info.input.nodata
        log.info("%s has no mask: pixels equal to %g in all bands are nodata", src.name, nodata)
    return Plan(
        grid=Grid(int(region.height), int(region.width), window, stride, align),
        region=region,
        bands=bands,
        source_dtype=src.dtypes[bands[0] - 1],
        scale=info.input.scale,
        nodata=nodata,
        views=tta_views(options.tta),
        num_classes=info.model.num_classes,
        probabilities=options.probabilities,
        tta=options.tta,
        fill=tuple(info.input.mean),
    )
