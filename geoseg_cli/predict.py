"""Streaming sliding-window inference: raster in, class-map GeoTIFF out (DESIGN.md §6).

For each input the pipeline is:

1. **plan** — the window grid over the region to predict, TTA views, batch size and a
   memory estimate, logged before anything runs;
2. for each **row band** (one row of windows), top to bottom:

   a. read the band's rows from the source, reflect-padded past the raster edges, and the
      valid-data mask;
   b. a :class:`WindowPredictor` (the pluggable step) turns the scaled band and the offsets
      of the windows that hold valid pixels into per-window probabilities: the window engine
      (:class:`EnginePredictor`, the paper's method, the default) runs the whole network on
      batches of windows × TTA views; the shared engine
      (:class:`~geoseg_cli.shared.SharedPredictor`) runs the backbone once per pixel and
      view and only the head per window;
   c. the probabilities, weighted by a smooth window, are added to a rolling accumulator that
      holds only the ``T`` rows still open;
   d. the rows no later window touches are divided by the summed weights and written (class
      map by argmax, optional probabilities) with windowed writes;

3. optional COG conversion and vector polygons; temporary files are renamed into place.

Memory is O(width × T × classes) and does not depend on the raster height.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
import rasterio
import rasterio.shutil
import shapely
import shapely.geometry
import torch
from rasterio.features import shapes
from rasterio.windows import Window

from geoseg_cli import __version__
from geoseg_cli.checkpoint import ModelInfo
from geoseg_cli.engine import FEATURE_STRIDE, Engine
from geoseg_cli.errors import CheckpointError, InputError, OutputError, UsageError
from geoseg_cli.progress import progress
from geoseg_cli.raster import (
    atomic_output,
    bounds_window,
    check_creation_options,
    check_output,
    has_mask,
    nodata_valid,
    open_raster,
    output_profile,
    read_masked,
)
from geoseg_cli.shared import (
    CPU_HEAD_BATCH,
    CPU_TILE,
    DEFAULT_HALO,
    RegionReader,
    SharedPredictor,
    default_head_batch,
    default_tile,
    feature_channels,
    has_streams,
    split_span,
    stream_rows,
)
from geoseg_cli.shared import memory_bytes as shared_memory_bytes
from geoseg_cli.tta import View, merge_views, tta_views
from geoseg_cli.windows import Grid, coverage, reflect_indices, weights_2d

log = logging.getLogger(__name__)

#: Suffix of default output names: ``scene.tif`` → ``scene_pred.tif``.
OUTPUT_SUFFIX = "_pred"
#: File name endings of the class map (and so of the probabilities) written.
GEOTIFF_SUFFIXES = (".tif", ".tiff")
#: Vector formats written by :func:`write_vector` with the standard library.
VECTOR_SUFFIXES = (".geojson", ".json")
#: Vector formats written through the optional ``pyogrio`` (single-file formats, so the
#: output can be written under a temporary name and renamed).
OGR_VECTOR_SUFFIXES = (".gpkg", ".fgb")
#: The model family's output stride: windows must be a multiple of it.
WINDOW_MULTIPLE = FEATURE_STRIDE
#: Inference methods: ``shared`` (backbone once per pixel) and ``window`` (the paper's).
ENGINES = ("shared", "window")
#: The default method. The shared engine is opt-in: at the default stride T/2 without TTA it
#: is about 3x faster on a 2-core CPU but gave the window engine's classes on only 97.9 % of
#: the pixels of a model trained on RGB.byte.tif (issue 8 asks 99 % for the default); at
#: window 448, stride 112 with flips it is 8.5-9x faster and agrees on 99.1 %.
DEFAULT_ENGINE = "window"
#: Backbone passes per pixel (windows covering it × TTA views) from which the window engine's
#: plan suggests the shared engine.
SHARED_HINT_PASSES = 8
#: Windows × views per forward pass of the window engine when the user gives no batch size.
DEFAULT_WINDOW_BATCH = 4
#: Smallest GDAL block cache used while predicting (bytes).
_MIN_GDAL_CACHE = 64 * 2**20
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
            per head pass (default: 4 for the window engine; for the shared engine 6 on a
            CPU, 16 on a GPU).
        bands: 1-based source bands in model channel order (default: the model's).
        nodata: Input nodata value overriding the raster's own masks.
        bounds: ``(left, bottom, right, top)`` in the raster CRS: predict only that part.
        probabilities: None, ``"uint8"`` (0–255) or ``"float32"``: also write per-class
            probabilities to ``<output stem>_probabilities.tif``.
        cog: Write Cloud-Optimized GeoTIFFs (with overviews).
        vector: Also write class polygons to this file (GeoJSON; GeoPackage or FlatGeobuf
            with ``pyogrio``).
        creation_options: GDAL creation options overriding the defaults.
        overwrite: Replace existing outputs.
        engine: ``"shared"`` computes the backbone once per pixel and TTA view and runs only
            the head per window (stride and grid rounded to multiples of 16); ``"window"``
            runs the whole network on every window (the paper's method, exact strides). The
            shared engine falls back to the window engine when the model cannot split into
            backbone and head, or when windows do not overlap (nothing to share).
        tile: Shared engine: largest backbone tile side in pixels, a multiple of 16
            (default: 1024 on a CPU, 2048 on a GPU); a PyTorch model streams rows instead of
            tiles, a quarter of this square at a time.
        halo: Shared engine: context around inner tile sides in pixels (a multiple of 16).
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
    engine: str = DEFAULT_ENGINE
    tile: int | None = None
    halo: int = DEFAULT_HALO


@dataclass(frozen=True)
class Plan:
    """What a prediction run will do, fixed before it starts.

    Attributes:
        grid: Window grid over the region.
        region: Part of the source raster that is predicted.
        bands: 1-based source bands read, in model channel order.
        source_dtype: Data type of those bands.
        scale: Factor from raw values to model input.
        nodata: Nodata value deciding valid pixels, or None to use the raster's masks.
        views: TTA views per window.
        batch_size: Images per forward pass.
        num_classes: Model classes.
        probabilities: Probability output type, or None.
        tta: TTA set name, or None.
        gdal_cache: GDAL block cache size (bytes) for the run: enough for the source
            blocks one row band (or strip of shared-engine tiles) touches, so the cache
            does not fill with the whole raster.
        engine: ``"shared"`` or ``"window"`` (after fallbacks).
        features: Backbone feature channels (shared engine), else None.
        streamed: Shared engine: the backbone streams rows (a PyTorch model), not tiles.
        tile: Shared engine: largest tile side.
        halo: Shared engine: context around inner tile sides.
    """

    grid: Grid
    region: Window
    bands: tuple[int, ...]
    source_dtype: str
    scale: float
    nodata: float | None
    views: tuple[View, ...]
    batch_size: int
    num_classes: int
    probabilities: str | None
    tta: str | None
    gdal_cache: int
    engine: str
    features: int | None
    streamed: bool
    tile: int
    halo: int

    @property
    def memory_bytes(self) -> int:
        """Estimated peak working memory of the pipeline, without the model's own."""
        g, k, c = self.grid, self.num_classes, len(self.bands)
        t, padded = g.window, g.padded_cols[1] - g.padded_cols[0]
        raw = np.dtype(self.source_dtype).itemsize
        accumulator = k * t * g.width * 4
        band = c * t * padded * (2 * raw + 4) + t * padded
        if self.engine == "shared":
            views = len(self.views)
            batch = shared_memory_bytes(
                g, views, c, self.features, k, self.batch_size, self.tile, self.halo, self.streamed
            )
        else:
            batch = self.batch_size * (c + 2 * k) * t * t * 4
        out_bytes = {None: 0, "uint8": 1, "float32": 4}[self.probabilities]
        writers = _BLOCK_ROWS * g.width * (2 + k * out_bytes)
        return accumulator + band + batch + writers + self.gdal_cache

    def describe(self) -> str:
        """One-line summary for the log."""
        g, views = self.grid, len(self.views)
        per_band = len(g.col_starts) * views
        passes = len(g.row_starts) * -(-per_band // self.batch_size)
        windows = (
            f"{g.count} windows ({len(g.row_starts)} rows x {len(g.col_starts)} cols) of "
            f"{g.window} px, stride {g.stride}, {views} TTA view(s): "
        )
        memory = f"about {self.memory_bytes / 2**20:.0f} MiB working memory besides the model"
        if self.engine == "window":
            return (
                f"{windows}window engine, at most {g.count * views} images in {passes} forward "
                f"passes of <= {self.batch_size}; {memory}"
            )
        (top, bottom), (left, right) = g.padded_rows, g.padded_cols
        if self.streamed:
            rows = stream_rows(self.tile, right - left)
            backbone = f"streamed over {right - left} px wide rows, {rows} at a time"
        else:
            tiles = len(split_span(top, bottom, self.tile)) * len(
                split_span(left, right, self.tile)
            )
            backbone = f"on {tiles} tile(s) of <= {self.tile} px (+{self.halo} px context)"
        return (
            f"{windows}shared engine, backbone once per pixel and view {backbone}, head on at "
            f"most {g.count * views} windows in {passes} passes of <= {self.batch_size}; "
            f"{memory} (cached features included)"
        )


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_raster` wrote.

    Attributes:
        output: The class map.
        probabilities: The probability raster, if asked for.
        vector: The polygon file, if asked for.
        windows: Windows predicted (windows holding only nodata are skipped).
        skipped: Windows skipped because they hold only nodata.
        polygons: Polygons written to ``vector``.
    """

    output: Path
    probabilities: Path | None
    vector: Path | None
    windows: int
    skipped: int
    polygons: int = 0


class WindowPredictor(Protocol):
    """The per-window model step of the pipeline (replaceable).

    The pipeline calls it once per row band, top to bottom, also for bands without windows
    to predict (empty ``offsets``), so a step may keep state across bands (the shared
    engine keeps backbone features for the rows later bands need).
    """

    def __call__(self, band: np.ndarray | None, offsets: Sequence[int]) -> Iterator[np.ndarray]:
        """Yield probabilities (K×T×T float32) for each window, in the order of ``offsets``.

        Args:
            band: Scaled input rows of one row band, C×T×(padded width) float32, padding
                included; None when no window needs them (no windows to predict, or the
                shared engine, which reads its own tiles).
            offsets: Column offsets into ``band`` of the windows to predict (each T wide).
        """
        ...


class EnginePredictor:
    """Runs an engine on windows × TTA views, ``batch_size`` images per forward pass.

    Every view's output is inverted and the views of a window are averaged in a fixed
    order, so results do not depend on the batch size or on how views fall into batches.
    """

    def __init__(self, engine: Engine, window: int, views: Sequence[View], batch_size: int) -> None:
        self.engine = engine
        self.window = window
        self.views = tuple(views)
        self.batch_size = batch_size

    def __call__(self, band: np.ndarray | None, offsets: Sequence[int]) -> Iterator[np.ndarray]:
        t = self.window
        return merge_views(
            len(offsets),
            self.views,
            self.batch_size,
            lambda i, v: self.views[v].apply(band[:, :, offsets[i] : offsets[i] + t]),
            self._forward,
        )

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        probs = self.engine.predict(np.ascontiguousarray(batch, dtype=np.float32))
        k = self.engine.info.model.num_classes
        expected = (batch.shape[0], k, batch.shape[2], batch.shape[3])
        if probs.shape != expected:
            raise CheckpointError(
                f"the model returned probabilities of shape {probs.shape} for input "
                f"{batch.shape} (expected {expected}); use --window {self.engine.info.window} "
                "or a model exported with --dynamic-size"
            )
        return probs


def class_dtype(num_classes: int) -> tuple[str, int]:
    """Output type and nodata of the class map: uint8/255, or uint16/65535 above 255 classes."""
    return ("uint8", 255) if num_classes <= 255 else ("uint16", 65535)


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

    The rule: the types must be equal, except that any floating-point type fits a
    floating-point model (scaling is the same). An integer type other than the model's
    means another value range (e.g. 8-bit vs 11-bit), which the checkpoint's scale would
    get wrong.

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


def make_plan(
    src: rasterio.DatasetReader,
    info: ModelInfo,
    options: PredictOptions,
    features: int | None = None,
    head_batch: int = CPU_HEAD_BATCH,
    tile: int = CPU_TILE,
    streams: bool = False,
) -> Plan:
    """Check the inputs against the model, pick the engine and fix the window grid.

    Args:
        src: The open input raster.
        info: The model description.
        options: The prediction options.
        features: Feature channels when the engine can run backbone and head separately
            (needed by the shared engine), else None.
        head_batch: The shared engine's batch size when ``options`` gives none.
        tile: The shared engine's largest tile side when ``options`` gives none.
        streams: Whether the engine streams features row by row (the shared engine then
            runs no tiles).

    Raises:
        UsageError: Bad window, stride, batch size, engine or band selection.
        InputError: The raster does not fit the model (bands, dtype) or the bounds miss it.
    """
    window = options.window or info.window
    if window < WINDOW_MULTIPLE or window % WINDOW_MULTIPLE:
        raise UsageError(f"--window {window} must be a positive multiple of {WINDOW_MULTIPLE}")
    stride = options.stride or window // 2
    if not 1 <= stride <= window:
        raise UsageError(f"--stride {stride} must be between 1 and the window ({window})")
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError(f"--batch-size {options.batch_size} must be at least 1")
    tile = options.tile or tile
    engine, stride = _choose_engine(src.name, options, features, window, stride, tile)
    if options.probabilities not in (None, "uint8", "float32"):
        raise UsageError(f"probabilities type {options.probabilities!r} is not uint8 or float32")
    bands = select_bands(src, info, options.bands)
    region = (
        bounds_window(src, options.bounds)
        if options.bounds
        else Window(0, 0, src.width, src.height)
    )
    # Windows start on the 16-px feature grid whenever the stride is on it, so that both
    # engines place the same windows (the shared engine's stride always is).
    align = FEATURE_STRIDE if stride % FEATURE_STRIDE == 0 else 1
    grid = Grid(int(region.height), int(region.width), window, stride, align)
    pad_lo, pad_hi = grid.padded_cols
    source_dtype = src.dtypes[bands[0] - 1]
    block_rows = src.block_shapes[bands[0] - 1][0]
    rows_read = window if engine == "window" else max(window, tile + 2 * options.halo)
    band_bytes = (
        (rows_read + 2 * block_rows)
        * min(src.width, pad_hi - pad_lo)
        * len(bands)
        * np.dtype(source_dtype).itemsize
    )
    nodata = options.nodata
    if nodata is None and info.input.nodata is not None and not has_mask(src, list(bands)):
        nodata = info.input.nodata
        log.info("%s has no mask: pixels equal to %g in all bands are nodata", src.name, nodata)
    return Plan(
        grid=grid,
        region=region,
        bands=bands,
        source_dtype=source_dtype,
        scale=info.input.scale,
        nodata=nodata,
        views=tta_views(options.tta),
        batch_size=options.batch_size
        or (head_batch if engine == "shared" else DEFAULT_WINDOW_BATCH),
        num_classes=info.model.num_classes,
        probabilities=options.probabilities,
        tta=options.tta,
        gdal_cache=max(_MIN_GDAL_CACHE, 2 * band_bytes),
        engine=engine,
        features=features if engine == "shared" else None,
        streamed=engine == "shared" and streams,
        tile=tile,
        halo=options.halo,
    )


def _choose_engine(
    name: str, options: PredictOptions, features: int | None, window: int, stride: int, tile: int
) -> tuple[str, int]:
    """The engine to run and its stride: the shared engine needs a model that splits into
    backbone and head, overlapping windows, and a stride that is a multiple of 16.

    Raises:
        UsageError: Unknown engine, or a tile/halo off the 16-px grid.
    """
    if options.engine not in ENGINES:
        raise UsageError(f"unknown engine {options.engine!r}; use one of {', '.join(ENGINES)}")
    if options.engine == "window":
        passes = (window / stride) ** 2 * len(tta_views(options.tta))
        if features is not None and passes >= SHARED_HINT_PASSES:
            log.info(
                "%s: the window engine runs the backbone about %.0f times per pixel; "
                "--engine shared runs it once per TTA view (8.5-9x faster at window 448, "
                "stride 112 with flips on a CPU)",
                name,
                passes,
            )
        return "window", stride
    s = FEATURE_STRIDE
    if tile < s or tile % s or options.halo < 0 or options.halo % s:
        raise UsageError(
            f"tile {tile} and halo {options.halo} must be multiples of {s} (tile at least {s})"
        )
    if features is None:
        log.info(
            "%s: the model cannot run its backbone and head separately (an ONNX model needs "
            "the .backbone.onnx and .head.onnx files geoseg export writes beside it); "
            "using the window engine",
            name,
        )
        return "window", stride
    rounded = min(window, max(s, (stride + s // 2) // s * s))  # nearest, halves up
    if rounded == window:
        log.info(
            "%s: stride %d leaves the windows without overlap: nothing to share, "
            "using the window engine",
            name,
            stride,
        )
        return "window", stride
    if rounded != stride:
        log.info(
            "%s: shared engine: stride %d rounded to %d, and the grid starts on a multiple "
            "of %d px (windows must start on the feature grid; --engine window keeps exact "
            "strides)",
            name,
            stride,
            rounded,
            s,
        )
    return "shared", rounded


def probabilities_path(output: Path) -> Path:
    """Where ``--probabilities`` writes: ``<output stem>_probabilities.tif`` beside it."""
    return output.with_name(f"{output.stem}_probabilities{output.suffix or '.tif'}")


def predict_raster(
    engine: Engine,
    source: str | os.PathLike,
    output: str | os.PathLike,
    options: PredictOptions | None = None,
    predictor: WindowPredictor | None = None,
) -> PredictResult:
    """Segment one raster into a class-map GeoTIFF (and optional extras).

    Args:
        engine: The model runtime (classes, input scaling, window, forward pass).
        source: Input raster (anything ``rasterio.open`` accepts).
        output: Class-map GeoTIFF to write.
        options: Prediction options (defaults: model window, stride T/2, no TTA).
        predictor: Replaces the per-window model step (default: the plan's engine, a
            :class:`~geoseg_cli.shared.SharedPredictor` or an :class:`EnginePredictor`).

    Returns:
        What was written.

    Raises:
        GeosegError: Bad input, bad options or an unwritable output; nothing is left under
            the final names.
    """
    options = options or PredictOptions()
    output = Path(output)
    extra = check_outputs(output, options, [source])
    with open_raster(source) as src:
        plan = make_plan(
            src,
            engine.info,
            options,
            feature_channels(engine),
            default_head_batch(engine),
            default_tile(engine),
            has_streams(engine),
        )
        log.info("%s: %s", source, plan.describe())
        step = predictor or _predictor(engine, plan, src)
        tags = _tags(engine, plan)
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_output(output, options.overwrite))
            prob_tmp = (
                stack.enter_context(atomic_output(extra["probabilities"], options.overwrite))
                if extra["probabilities"]
                else None
            )
            vector_tmp = (
                stack.enter_context(atomic_output(extra["vector"], options.overwrite))
                if extra["vector"]
                else None
            )
            stream_class = tmp.with_name(f"stream-{tmp.name}") if options.cog else tmp
            stream_prob = (
                prob_tmp.with_name(f"stream-{prob_tmp.name}")
                if prob_tmp and options.cog
                else prob_tmp
            )
            co = {} if options.cog else options.creation_options
            # GDAL's block cache would otherwise keep every block read or written (up to 5 %
            # of RAM), so memory would grow with the raster height; a user's setting wins.
            cache = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": plan.gdal_cache}
            with rasterio.Env(**cache):
                ran, skipped = _stream(
                    src, plan, step, engine.info, tags, stream_class, stream_prob, co
                )
            if ran == 0:
                raise InputError(
                    f"{source}: every pixel of the predicted area is nodata; "
                    "check --nodata, -b or --bounds"
                )
            if options.cog:
                _to_cog(stream_class, tmp, "MODE", options.creation_options)
                if prob_tmp:
                    _to_cog(stream_prob, prob_tmp, "AVERAGE", options.creation_options)
            polygons = write_vector(tmp, vector_tmp, engine.info) if vector_tmp is not None else 0
    log.info("%s: %d windows predicted, %d nodata-only windows skipped", source, ran, skipped)
    if extra["vector"]:
        log.info("%s: %d polygons", extra["vector"], polygons)
    return PredictResult(output, extra["probabilities"], extra["vector"], ran, skipped, polygons)


def check_outputs(
    output: Path, options: PredictOptions, sources: Sequence[str | os.PathLike] = ()
) -> dict[str, Path | None]:
    """Check the class map and the extra outputs the options ask for.

    Args:
        output: The class map.
        options: The options (extra outputs, ``overwrite``).
        sources: The input rasters, which no output may replace.

    Returns:
        ``{"probabilities": path or None, "vector": path or None}``.

    Raises:
        UsageError: An output not named .tif/.tiff, creation options GDAL rejects, an
            unsupported vector format, or an output that is an input.
        OutputError: An output exists (without ``overwrite``) or its folder is missing.
    """
    extra = {
        "probabilities": probabilities_path(output) if options.probabilities else None,
        "vector": Path(options.vector) if options.vector else None,
    }
    if output.suffix.lower() not in GEOTIFF_SUFFIXES:
        raise UsageError(
            f"{output}: predictions are GeoTIFFs; name the output .tif or .tiff "
            "(or give an existing folder)"
        )
    check_creation_options(options.creation_options, "COG" if options.cog else "GTiff")
    suffix = extra["vector"].suffix.lower() if extra["vector"] else None
    if suffix is not None and suffix not in VECTOR_SUFFIXES + OGR_VECTOR_SUFFIXES:
        raise UsageError(
            f"--vector {extra['vector']}: write .geojson, .gpkg or .fgb (convert afterwards "
            "for other formats: ogr2ogr out.shp out.gpkg)"
        )
    if suffix in OGR_VECTOR_SUFFIXES and importlib.util.find_spec("pyogrio") is None:
        raise UsageError(
            f"--vector {extra['vector']}: writing {suffix} needs the optional vector writer: "
            "pip install 'geoseg[vector]', or write .geojson"
        )
    inputs = {Path(p).resolve() for p in sources if Path(p).exists()}
    for path in (output, *(p for p in extra.values() if p)):
        if path.resolve() in inputs:
            raise UsageError(f"{path} is an input raster; write the prediction elsewhere (-o)")
        check_output(path, options.overwrite)
    return extra


def predict_rasters(
    engine: Engine,
    sources: Sequence[str],
    outputs: Sequence[Path],
    vectors: Sequence[Path | None],
    options: PredictOptions,
) -> Iterator[PredictResult]:
    """Predict several rasters in turn, refusing existing outputs, and inputs that are
    unreadable or do not fit the model (bands, data type, ``--bounds``), before the first
    starts.

    Yields:
        One result per source, as each finishes.
    """
    per_output = [dataclasses.replace(options, vector=v) for v in vectors]
    for output, output_options in zip(outputs, per_output, strict=True):
        check_outputs(output, output_options, sources)
    if len(sources) > 1:
        for source in sources:
            with open_raster(source) as src:
                select_bands(src, engine.info, options.bands)
                if options.bounds:
                    bounds_window(src, options.bounds)
    for source, output, output_options in zip(sources, outputs, per_output, strict=True):
        yield predict_raster(engine, source, output, output_options)


def _predictor(engine: Engine, plan: Plan, src: rasterio.DatasetReader) -> WindowPredictor:
    """The model step the plan asks for."""
    if plan.engine == "window":
        return EnginePredictor(engine, plan.grid.window, plan.views, plan.batch_size)
    return SharedPredictor(
        engine,
        plan.grid,
        plan.views,
        _region_reader(src, plan),
        batch_size=plan.batch_size,
        tile=plan.tile,
        halo=plan.halo,
    )


def _region_reader(src: rasterio.DatasetReader, plan: Plan) -> RegionReader:
    """Reads scaled bands over region pixel spans, reflect-padded past the raster edges (as
    the row bands are)."""

    top, left = int(plan.region.row_off), int(plan.region.col_off)

    def read(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        row_idx = reflect_indices(top + rows[0], top + rows[1], src.height)
        col_idx = reflect_indices(left + cols[0], left + cols[1], src.width)
        r0, c0 = int(row_idx.min()), int(col_idx.min())
        window = Window(c0, r0, int(col_idx.max()) + 1 - c0, int(row_idx.max()) + 1 - r0)
        data = src.read(list(plan.bands), window=window)
        return np.multiply(data[:, row_idx - r0][:, :, col_idx - c0], plan.scale, dtype=np.float32)

    return read


def _tags(engine: Engine, plan: Plan) -> dict[str, str]:
    info = engine.info
    return {
        "GEOSEG_VERSION": __version__,
        "MODEL": f"{info.model.variant}/{info.model.backbone}",
        "MODEL_HASH": engine.model_hash,
        "CLASSES": json.dumps({str(i): c.name for i, c in enumerate(info.classes)}),
        "WINDOW": str(plan.grid.window),
        "STRIDE": str(plan.grid.stride),
        "TTA": plan.tta or "none",
        "ENGINE": plan.engine,
    }


def _stream(
    src: rasterio.DatasetReader,
    plan: Plan,
    step: WindowPredictor,
    info: ModelInfo,
    tags: dict[str, str],
    class_path: Path,
    prob_path: Path | None,
    creation_options: dict[str, str],
) -> tuple[int, int]:
    """Run the row-band loop; returns (windows predicted, windows skipped)."""
    grid, region = plan.grid, plan.region
    t, s, k = grid.window, grid.stride, plan.num_classes
    height, width = grid.height, grid.width
    rows, cols = grid.row_starts, grid.col_starts
    pad_lo, pad_hi = grid.padded_cols
    col_idx = reflect_indices(region.col_off + pad_lo, region.col_off + pad_hi, src.width)
    read_c0 = int(col_idx.min())
    col_idx -= read_c0
    region_c0 = int(region.col_off) - read_c0
    weights = torch.from_numpy(weights_2d(t))
    row_cov = coverage(rows, t, height)
    col_cov = coverage(cols, t, width).astype(np.float32)
    accumulator = np.zeros((k, t, width), dtype=np.float32)
    # Blended in place through a tensor view: one multithreaded pass per window.
    blended = torch.from_numpy(accumulator)
    ran = skipped = 0

    with contextlib.ExitStack() as stack:
        dtype, nodata = class_dtype(k)
        class_dst = stack.enter_context(
            rasterio.open(
                class_path,
                "w",
                **output_profile(
                    src,
                    count=1,
                    dtype=dtype,
                    nodata=nodata,
                    window=region,
                    creation_options=creation_options,
                ),
            )
        )
        _decorate_class_map(class_dst, info, tags)
        writers = [_RowWriter(class_dst, with_mask=False)]
        if prob_path is not None:
            prob_dst = stack.enter_context(
                rasterio.open(
                    prob_path,
                    "w",
                    **output_profile(
                        src,
                        count=k,
                        dtype=plan.probabilities,
                        nodata=None,
                        window=region,
                        creation_options=creation_options,
                    ),
                )
            )
            prob_dst.update_tags(**tags)
            for i, c in enumerate(info.classes, start=1):
                prob_dst.set_band_description(i, c.name)
            writers.append(_RowWriter(prob_dst, with_mask=True))
        bar = stack.enter_context(progress(total=grid.count, unit="win", desc=str(src.name)))

        for b, r in enumerate(rows):
            r = int(r)
            row_idx = reflect_indices(region.row_off + r, region.row_off + r + t, src.height)
            read_r0 = int(row_idx.min())
            read = Window(
                read_c0, read_r0, int(col_idx.max()) + 1, int(row_idx.max()) + 1 - read_r0
            )
            data, valid = _read(src, plan, read)
            y0, y1 = max(0, r), min(height, r + t)
            band_valid = valid[
                region.row_off + y0 - read_r0 : region.row_off + y1 - read_r0,
                region_c0 : region_c0 + width,
            ]
            has_data = band_valid.any(axis=0)
            kept = [int(c) for c in cols if has_data[max(0, c) : c + t].any()]
            # The step sees every band, in order, even one without windows to predict; only
            # the window engine reads the band's pixels (the shared engine reads its tiles).
            band = None
            if kept and plan.engine == "window":
                band = np.multiply(
                    data[:, row_idx - read_r0][:, :, col_idx], plan.scale, dtype=np.float32
                )
            del data
            windows = step(band, [c - pad_lo for c in kept])
            for c, probs in zip(kept, windows, strict=True):
                x0, x1 = max(0, c), min(width, c + t)
                blended[:, :, x0:x1].addcmul_(
                    torch.from_numpy(probs)[:, :, x0 - c : x1 - c], weights[:, x0 - c : x1 - c]
                )
            ran += len(kept)
            skipped += len(cols) - len(kept)
            bar.update(len(cols))

            f0, f1 = grid.finished_rows(b)
            if f1 > f0:
                sums = accumulator[:, f0 - r : f1 - r]
                ok = band_valid[f0 - y0 : f1 - y0]
                # every class of a pixel has the same summed weight: the class map needs
                # the weighted sums only
                class_map = sums.argmax(axis=0).astype(dtype)
                class_map[~ok] = nodata
                writers[0].write(class_map[np.newaxis], ok)
                if prob_path is not None:
                    probs = sums / (row_cov[f0:f1, None].astype(np.float32) * col_cov[None, :])
                    if plan.probabilities == "uint8":
                        probs = np.rint(probs * 255)
                    probs[:, ~ok] = 0
                    writers[1].write(probs.astype(plan.probabilities), ok)
            if b + 1 < len(rows):
                accumulator[:, : t - s] = accumulator[:, s:]
                accumulator[:, t - s :] = 0
        for writer in writers:
            writer.flush()
    return ran, skipped


def _read(src: rasterio.DatasetReader, plan: Plan, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Raw bands and valid mask over ``window`` (by the plan's nodata rule)."""
    if plan.nodata is None:
        return read_masked(src, window, list(plan.bands))
    data = src.read(list(plan.bands), window=window)
    return data, nodata_valid(data, plan.nodata)


def _decorate_class_map(
    dst: rasterio.io.DatasetWriter, info: ModelInfo, tags: dict[str, str]
) -> None:
    dst.update_tags(**tags)
    dst.set_band_description(1, "class")
    colormap = {i: (*c.color, 255) for i, c in enumerate(info.classes)}
    colormap[int(dst.nodata)] = (0, 0, 0, 0)
    dst.write_colormap(1, colormap)


class _RowWriter:
    """Collects finished rows and writes them one block row at a time, so that every
    compressed tile is written once, whole."""

    def __init__(self, dst: rasterio.io.DatasetWriter, with_mask: bool) -> None:
        self.dst = dst
        self.rows = dst.block_shapes[0][0]
        self.buffer = np.zeros((dst.count, self.rows, dst.width), dtype=dst.dtypes[0])
        self.valid = np.zeros((self.rows, dst.width), dtype=np.uint8) if with_mask else None
        self.top = 0
        self.filled = 0

    def write(self, data: np.ndarray, valid: np.ndarray) -> None:
        """Append rows (``count×n×width``) and their valid mask (``n×width``)."""
        done = 0
        while done < data.shape[1]:
            n = min(data.shape[1] - done, self.rows - self.filled)
            self.buffer[:, self.filled : self.filled + n] = data[:, done : done + n]
            if self.valid is not None:
                self.valid[self.filled : self.filled + n] = np.where(valid[done : done + n], 255, 0)
            self.filled += n
            done += n
            if self.filled == self.rows:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows."""
        if not self.filled:
            return
        window = Window(0, self.top, self.dst.width, self.filled)
        self.dst.write(self.buffer[:, : self.filled], window=window)
        if self.valid is not None:
            self.dst.write_mask(self.valid[: self.filled], window=window)
        self.top += self.filled
        self.filled = 0


def _to_cog(source: Path, target: Path, resampling: str, creation_options: dict[str, str]) -> None:
    """Copy a GeoTIFF to a Cloud-Optimized GeoTIFF with overviews (GDAL's COG driver)."""
    options = {"COMPRESS": "DEFLATE", "BIGTIFF": "IF_SAFER", "OVERVIEW_RESAMPLING": resampling}
    options.update({key.upper(): value for key, value in creation_options.items()})
    rasterio.shutil.copy(source, target, driver="COG", **options)


def write_vector(raster: str | os.PathLike, target: str | os.PathLike, info: ModelInfo) -> int:
    """Write the class polygons of a class map in the raster's CRS, with attributes
    ``class_id`` and ``class`` (name): GeoJSON, or GeoPackage / FlatGeobuf (by the suffix of
    ``target``) through the optional ``pyogrio``.

    The whole map is polygonized at once (GDAL reads the band line by line), so polygons
    are merged across window borders; memory grows with the number of polygons, not with
    the raster. Nodata pixels produce no polygons.

    Args:
        raster: Class-map GeoTIFF (uint8/uint16, nodata set).
        target: Vector file to write (one of :data:`VECTOR_SUFFIXES` or
            :data:`OGR_VECTOR_SUFFIXES`).
        info: Model description (class names).

    Returns:
        Number of polygons written.
    """
    with rasterio.open(raster) as ds:
        polygons = (
            (geometry, int(value))
            for geometry, value in shapes(rasterio.band(ds, 1), transform=ds.transform)
            if int(value) != ds.nodata
        )
        if Path(target).suffix.lower() in OGR_VECTOR_SUFFIXES:
            return _write_ogr(polygons, ds.crs, target, info)
        return _write_geojson(polygons, ds.crs, target, info)


def _write_geojson(
    polygons: Iterable[tuple[dict, int]],
    crs: rasterio.crs.CRS | None,
    target: str | os.PathLike,
    info: ModelInfo,
) -> int:
    """Stream (GeoJSON geometry, class id) pairs into a FeatureCollection; their number."""
    count = 0
    with open(target, "w", encoding="utf-8") as f:
        header = {"type": "FeatureCollection", "name": Path(target).stem}
        member = _geojson_crs(crs)
        if member:
            header["crs"] = member
        f.write(json.dumps(header)[:-1] + ', "features": [\n')
        for geometry, class_id in polygons:
            feature = {
                "type": "Feature",
                "properties": {"class_id": class_id, "class": info.classes[class_id].name},
                "geometry": geometry,
            }
            f.write((",\n" if count else "") + json.dumps(feature))
            count += 1
        f.write("\n]}\n")
    return count


def _write_ogr(
    polygons: Iterable[tuple[dict, int]],
    crs: rasterio.crs.CRS | None,
    target: str | os.PathLike,
    info: ModelInfo,
) -> int:
    """Write (GeoJSON geometry, class id) pairs with pyogrio (driver from the suffix, one
    layer named after the file); their number."""
    import pyogrio.raw

    geometries, ids = [], []
    for geometry, class_id in polygons:
        geometries.append(shapely.geometry.shape(geometry))
        ids.append(class_id)
    names = np.array([info.classes[i].name for i in ids], dtype=object)
    pyogrio.raw.write(
        target,
        shapely.to_wkb(geometries),
        [np.array(ids, dtype=np.int32), names],
        fields=["class_id", "class"],
        geometry_type="Polygon",
        crs=crs.to_wkt() if crs else None,
        layer=Path(target).stem,
    )
    return len(ids)


def _geojson_crs(crs: rasterio.crs.CRS | None) -> dict | None:
    """The (GeoJSON 2008) ``crs`` member GDAL and QGIS read: an OGC URN, else the WKT."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    if epsg == 4326:
        name = "urn:ogc:def:crs:OGC:1.3:CRS84"
    elif epsg is not None:
        name = f"urn:ogc:def:crs:EPSG::{epsg}"
    else:
        name = crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def output_paths(
    inputs: Sequence[str], output: str | os.PathLike | None, suffix: str = ".tif"
) -> list[Path]:
    """Output path of each input: ``<stem>_pred.tif`` in the current folder by default,
    in ``output`` when it is a folder, or ``output`` itself for a single input.

    Raises:
        UsageError: Several inputs with a file output, or two inputs with the same name.
        OutputError: An output folder that does not exist.
    """
    names = [f"{PurePosixPath(str(i).split('?')[0]).stem}{OUTPUT_SUFFIX}{suffix}" for i in inputs]
    if output is None:
        paths = [Path.cwd() / n for n in names]
    elif Path(output).is_dir() or str(output).endswith(("/", os.sep)):
        if not Path(output).is_dir():
            raise OutputError(f"output folder {output} does not exist; create it first")
        paths = [Path(output) / n for n in names]
    elif len(inputs) > 1:
        raise UsageError(f"{len(inputs)} inputs need -o to be an existing folder, not {output}")
    else:
        paths = [Path(output)]
    if len(set(paths)) != len(paths):
        raise UsageError("two inputs have the same file name; predict them into separate folders")
    return paths


def vector_paths(vector: str | os.PathLike | None, outputs: Sequence[Path]) -> list[Path | None]:
    """Vector output of each class map: ``vector`` itself for one output, or
    ``<output stem>.geojson`` inside ``vector`` when it is a folder."""
    if vector is None:
        return [None] * len(outputs)
    if Path(vector).is_dir() or str(vector).endswith(("/", os.sep)):
        if not Path(vector).is_dir():
            raise OutputError(f"vector folder {vector} does not exist; create it first")
        return [Path(vector) / f"{o.stem}.geojson" for o in outputs]
    if len(outputs) > 1:
        raise UsageError(f"{len(outputs)} inputs need --vector to be an existing folder")
    return [Path(vector)]


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The share of ``items`` for one rank: ``items[rank::world_size]``."""
    return list(items[rank::world_size])


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (``(0, 1)`` outside torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
