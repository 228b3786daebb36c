"""Streaming sliding-window inference: raster in, class-map GeoTIFF out (DESIGN.md §6)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg_cli.errors import InputError
from geoseg_cli.inference.background import ReadAhead, WriteBehind
from geoseg_cli.inference.outputs import (
    Outputs,
    RowWriter,
    check_outputs,
    open_writers,
    output_tags,
    to_cog,
)
from geoseg_cli.inference.plan import Plan, PredictOptions, check_window, make_plan, select_bands
from geoseg_cli.inference.reading import band_loader, region_reader
from geoseg_cli.inference.runtime import Runtime, check_shape
from geoseg_cli.inference.shared import SharedPredictor
from geoseg_cli.inference.tta import mean_of_views, merge_views, tta_views
from geoseg_cli.inference.windows import coverage, weights_2d
from geoseg_cli.progress import progress
from geoseg_cli.raster import (
    atomic_output,
    bounds_window,
    open_raster,
)
from geoseg_cli.vector import write_class_polygons

log = logging.getLogger(__name__)

#: Backbone passes per pixel (windows covering it × TTA views) from which the window
#: engine's plan suggests the shared engine.
SHARED_HINT_PASSES = 8
#: Smallest GDAL block cache used while predicting (bytes).
_MIN_GDAL_CACHE = 64 * 2**20


class Predictor(Protocol):
    """The per-window model step of the row-band loop, with its share of the plan.

    Attributes:
        name: The engine's name (``window`` or ``shared``), written to the output tags.
        source_rows: Raster rows one pass reads at most (sizes the GDAL block cache).
        needs_band: Whether the step takes the row band's pixels (else it reads its own).
    """

    name: str
    source_rows: int
    needs_band: bool

    def __call__(self, band: np.ndarray | None, offsets: Sequence[int]) -> Iterator[np.ndarray]:
        """Yield probabilities (K×T×T float32) for each window, in the order of ``offsets``.

        Called once per row band, top to bottom, also for bands without windows to predict
        (empty ``offsets``), so a step may keep state across bands.

        Args:
            band: Scaled input rows of the row band, C×T×(padded width) float32, or None
                when no window needs them.
            offsets: Column offsets into ``band`` of the windows to predict (each T wide).
        """
        ...

    def memory_bytes(self) -> int:
        """Working memory of the step besides the model's own."""
        ...

    def describe(self) -> str:
        """The engine part of the plan log."""
        ...


def balanced_batch(images: int, largest: int) -> int:
    """The batch size that runs ``images`` in the fewest passes of <= ``largest``, evenly."""
    passes = -(-images // largest)
    return -(-images // passes)


class WindowPredictor:
    """The paper's method: the whole network on every window × TTA view, in batches.

    Every view's output is inverted and the views of a window are averaged in a fixed
    order, so results do not depend on the batch size.

    Args:
        runtime: The model runtime.
        plan: The run's plan.
        batch_size: Images (windows × views) per forward pass (default: a row band's
            images in as few passes of at most :data:`DEFAULT_BATCH` on a CPU or
            :data:`GPU_BATCH` on a GPU as can hold them, evenly filled).
    """

    name = "window"
    needs_band = True
    #: Largest default number of windows × views per forward pass on a CPU and on a GPU.
    DEFAULT_BATCH, GPU_BATCH = 4, 16

    def __init__(self, runtime: Runtime, plan: Plan, batch_size: int | None = None) -> None:
        self.runtime = runtime
        self.plan = plan
        largest = self.GPU_BATCH if runtime.on_gpu else self.DEFAULT_BATCH
        images = len(plan.grid.col_starts) * len(plan.views)
        self.batch_size = batch_size or balanced_batch(images, largest)
        self.source_rows = plan.grid.window

    def __call__(self, band: np.ndarray | None, offsets: Sequence[int]) -> Iterator[np.ndarray]:
        """Probabilities of the windows at ``offsets`` of ``band``."""
        t, views = self.plan.grid.window, self.plan.views
        return merge_views(
            len(offsets),
            views,
            self.batch_size,
            lambda i, v: views[v].apply(band[:, :, offsets[i] : offsets[i] + t]),
            self._forward,
            mean_of_views,
        )

    def memory_bytes(self) -> int:
        """One forward pass's inputs and outputs."""
        t, c, k = self.plan.grid.window, len(self.plan.bands), self.plan.num_classes
        return self.batch_size * (c + 2 * k) * t * t * 4

    def describe(self) -> str:
        """The engine part of the plan log."""
        g, views = self.plan.grid, len(self.plan.views)
        passes = len(g.row_starts) * -(-len(g.col_starts) * views // self.batch_size)
        return (
            f"window engine, at most {g.count * views} images in {passes} forward passes "
            f"of <= {self.batch_size}"
        )

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        probs = self.runtime.predict(np.ascontiguousarray(batch, dtype=np.float32))
        expected = (batch.shape[0], self.plan.num_classes, *batch.shape[2:])
        fix = f"use --window {self.runtime.info.window} or a model exported with --dynamic-size"
        return check_shape(probs, expected, f"probabilities for input {batch.shape}", fix)


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


def _engine_stride(
    name: str, runtime: Runtime, options: PredictOptions, window: int, stride: int
) -> tuple[type[WindowPredictor] | type[SharedPredictor], int]:
    """The engine to run and its stride, with the shared engine's fallbacks logged.

    The shared engine needs a runtime that runs backbone and head separately, and
    overlapping windows once its stride is rounded to the feature grid.
    """
    if options.engine == WindowPredictor.name:
        passes = (window / stride) ** 2 * len(tta_views(options.tta))
        if runtime.feature_channels is not None and passes >= SHARED_HINT_PASSES:
            log.info(
                "%s: the window engine runs the backbone about %.0f times per pixel; "
                "--engine shared runs it once per TTA view",
                name,
                passes,
            )
        return WindowPredictor, stride
    if runtime.feature_channels is None:
        log.info(
            "%s: the model cannot run its backbone and head separately (an ONNX model needs "
            "the .backbone.onnx and .head.onnx files geoseg export writes beside it); "
            "using the window engine",
            name,
        )
        return WindowPredictor, stride
    unit = runtime.output_stride
    rounded = SharedPredictor.grid_stride(window, stride, unit)
    if rounded == window:
        log.info(
            "%s: stride %d leaves the windows without overlap: nothing to share, "
            "using the window engine",
            name,
            stride,
        )
        return WindowPredictor, stride
    if rounded != stride:
        log.info(
            "%s: shared engine: stride %d rounded to %d, and the grid starts on a multiple "
            "of %d px (windows must start on the feature grid; --engine window keeps exact "
            "strides)",
            name,
            stride,
            rounded,
            unit,
        )
    return SharedPredictor, rounded


def prepare(
    runtime: Runtime, src: rasterio.DatasetReader, options: PredictOptions
) -> tuple[Plan, Predictor]:
    """Check the options, the raster and the model, and build the plan and its engine.

    Raises:
        UsageError: Bad window, stride, batch size, engine, tile or band selection.
        InputError: The raster does not fit the model (bands, dtype) or the bounds miss it.
    """
    options.check()
    window = options.window or runtime.info.window
    stride = options.stride or window // 2
    check_window(window, stride, runtime.output_stride)
    engine, stride = _engine_stride(src.name, runtime, options, window, stride)
    plan = make_plan(src, runtime.info, options, window, stride, runtime.output_stride)
    if engine is WindowPredictor:
        return plan, WindowPredictor(runtime, plan, options.batch_size)
    read = region_reader(src, plan)
    return plan, SharedPredictor(
        runtime, plan, read, options.batch_size, options.tile, options.halo
    )


def predict_raster(
    runtime: Runtime,
    source: str | os.PathLike,
    output: str | os.PathLike,
    options: PredictOptions | None = None,
) -> PredictResult:
    """Segment one raster into a class-map GeoTIFF (and optional extras).

    For each row band of windows, top to bottom: read the band's rows (reflect-padded past
    the raster edges) and valid mask; the engine turns the windows holding valid pixels
    into probabilities; these, weighted by a smooth window, are added to a rolling
    accumulator holding only the rows still open; rows no later window touches get their
    class by argmax and are written. Memory is O(width × T × classes), whatever the height.

    Args:
        runtime: The model runtime (classes, input scaling, window, forward pass).
        source: Input raster (anything ``rasterio.open`` accepts).
        output: Class-map GeoTIFF to write.
        options: Prediction options (defaults: model window, stride T/2, no TTA).

    Returns:
        What was written.

    Raises:
        GeosegError: Bad input, bad options or an unwritable output; nothing is left under
            the final names.
    """
    options = options or PredictOptions()
    outputs = _check_outputs(Path(output), options, [source])
    with open_raster(source) as src:
        plan, predictor = prepare(runtime, src, options)
        memory = plan.memory_bytes() + predictor.memory_bytes()
        log.info(
            "%s: %s: %s; about %.0f MiB working memory besides the model",
            source,
            plan.describe(),
            predictor.describe(),
            memory / 2**20,
        )
        tags = output_tags(runtime.info, runtime.model_hash, plan, predictor.name)
        with contextlib.ExitStack() as stack:
            tmps = [stack.enter_context(atomic_output(p, options.overwrite)) for p in outputs.all()]
            class_tmp = tmps[0]
            prob_tmp = tmps[1] if outputs.probabilities else None
            vector_tmp = tmps[-1] if outputs.vector else None
            stream_class, stream_prob = class_tmp, prob_tmp
            if options.cog:  # stream to plain GeoTIFFs first, then copy them to COGs
                stream_class = class_tmp.with_name(f"stream-{class_tmp.name}")
                stream_prob = prob_tmp and prob_tmp.with_name(f"stream-{prob_tmp.name}")
            co = {} if options.cog else options.creation_options
            # GDAL's block cache would otherwise keep every block read or written (up to 5 %
            # of RAM), so memory would grow with the raster height; a user's setting wins.
            cache = _gdal_cache(src, plan, predictor.source_rows)
            env = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": cache}
            probabilities = (stream_prob, plan.probabilities) if stream_prob else None
            with (
                rasterio.Env(**env),
                open_writers(
                    src, plan.region, runtime.info, tags, stream_class, probabilities, co
                ) as writers,
            ):
                ran, skipped = _stream(src, plan, predictor, writers)
            if ran == 0:
                raise InputError(
                    f"{source}: every pixel of the predicted area is nodata; "
                    "check --nodata, -b or --bounds"
                )
            if options.cog:
                to_cog(stream_class, class_tmp, "MODE", options.creation_options)
                if prob_tmp:
                    to_cog(stream_prob, prob_tmp, "AVERAGE", options.creation_options)
            polygons = (
                write_class_polygons(class_tmp, vector_tmp, runtime.info.classes)
                if vector_tmp
                else 0
            )
    log.info("%s: %d windows predicted, %d nodata-only windows skipped", source, ran, skipped)
    if outputs.vector:
        log.info("%s: %d polygons", outputs.vector, polygons)
    return PredictResult(
        outputs.classes, outputs.probabilities, outputs.vector, ran, skipped, polygons
    )


def _check_outputs(
    output: Path, options: PredictOptions, sources: Sequence[str | os.PathLike]
) -> Outputs:
    return check_outputs(
        output,
        options.probabilities is not None,
        Path(options.vector) if options.vector else None,
        options.cog,
        options.creation_options,
        options.overwrite,
        sources,
    )


def predict_rasters(
    runtime: Runtime,
    sources: Sequence[str],
    outputs: Sequence[Path],
    vectors: Sequence[Path | None],
    options: PredictOptions,
) -> Iterator[PredictResult]:
    """Predict several rasters in turn, after checking every input and output.

    Existing outputs, unreadable inputs and inputs that do not fit the model (bands, data
    type, ``--bounds``) are refused before the first raster starts.

    Yields:
        One result per source, as each finishes.
    """
    per_output = [dataclasses.replace(options, vector=v) for v in vectors]
    for output, output_options in zip(outputs, per_output, strict=True):
        _check_outputs(output, output_options, sources)
    if len(sources) > 1:
        for source in sources:
            with open_raster(source) as src:
                select_bands(src, runtime.info, options.bands)
                if options.bounds:
                    bounds_window(src, options.bounds)
    for source, output, output_options in zip(sources, outputs, per_output, strict=True):
        yield predict_raster(runtime, source, output, output_options)


def _gdal_cache(src: rasterio.DatasetReader, plan: Plan, source_rows: int) -> int:
    """A GDAL block cache (bytes) holding the source blocks one pass touches, no more."""
    first = plan.bands[0] - 1
    block_rows = src.block_shapes[first][0]
    row_bytes = min(src.width, plan.padded_width) * len(plan.bands)
    row_bytes *= np.dtype(src.dtypes[first]).itemsize
    return max(_MIN_GDAL_CACHE, 2 * (source_rows + 2 * block_rows) * row_bytes)


def _non_finite(src: rasterio.DatasetReader, region: Window, row: int, col: int) -> InputError:
    """The error for a window whose probabilities are NaN or infinite."""
    top, left = max(0, int(region.row_off) + row), max(0, int(region.col_off) + col)
    return InputError(
        f"{src.name}: the model returned NaN/inf probabilities for the window at row {top}, "
        f"column {left}, whose finite input is far outside what the model was trained on "
        "(e.g. a fill value such as -3.4e38): mark such values nodata with --nodata VALUE or "
        "gdal_edit -a_nodata, or rescale the raster"
    )


def _stream(
    src: rasterio.DatasetReader,
    plan: Plan,
    predictor: Predictor,
    writers: list[RowWriter],
) -> tuple[int, int]:
    """Run the row-band loop; returns (windows predicted, windows skipped).

    The next band is read, and finished rows are written, on background threads.
    """
    grid, region = plan.grid, plan.region
    t, s, k = grid.window, grid.stride, plan.num_classes
    height, width = grid.height, grid.width
    rows, cols = grid.row_starts, grid.col_starts
    pad_lo = grid.padded_cols[0]
    weights = weights_2d(t)
    row_cov = coverage(rows, t, height).astype(np.float32)
    col_cov = coverage(cols, t, width).astype(np.float32)
    accumulator = np.zeros((k, t, width), dtype=np.float32)
    scratch = np.empty((k, t, t), dtype=np.float32)
    nodata = writers[0].dst.nodata
    load = band_loader(src, plan, predictor.needs_band)
    ran = skipped = 0
    with (
        progress(total=grid.count, unit="win", desc=str(src.name)) as bar,
        ReadAhead(load, len(rows)) as bands,
        WriteBehind(writers) as output,
    ):
        for b, r in enumerate(rows):
            r = int(r)
            band, band_valid, kept = bands.get(b)
            # The step sees every band, in order, even one without windows to predict.
            for c, probs in zip(kept, predictor(band, [c - pad_lo for c in kept]), strict=True):
                if not np.isfinite(probs).all():
                    raise _non_finite(src, region, r, c)
                x0, x1 = max(0, c), min(width, c + t)
                part = np.multiply(
                    probs[:, :, x0 - c : x1 - c],
                    weights[:, x0 - c : x1 - c],
                    out=scratch[:, :, : x1 - x0],
                )
                accumulator[:, :, x0:x1] += part
            ran += len(kept)
            skipped += len(cols) - len(kept)
            bar.update(len(cols))

            f0, f1 = grid.finished_rows(b)
            if f1 > f0:
                y0 = max(0, r)
                sums = accumulator[:, f0 - r : f1 - r]
                ok = band_valid[f0 - y0 : f1 - y0]
                # every class of a pixel has the same summed weight: the class map needs
                # the weighted sums only
                class_map = sums.argmax(axis=0).astype(writers[0].dst.dtypes[0])
                class_map[~ok] = nodata
                blocks = [class_map[np.newaxis]]
                if len(writers) > 1:
                    probs = sums / (row_cov[f0:f1, None] * col_cov[None, :])
                    if plan.probabilities == "uint8":
                        probs = np.rint(probs * 255)
                    probs[:, ~ok] = 0
                    blocks.append(probs.astype(plan.probabilities))
                output.write(ok, *blocks)
            if b + 1 < len(rows):
                accumulator[:, : t - s] = accumulator[:, s:]
                accumulator[:, t - s :] = 0
    return ran, skipped
