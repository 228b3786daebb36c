"""The shared engine: the backbone once per pixel and TTA view, only the SCG head per window."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from geoseg_cli.errors import UsageError
from geoseg_cli.inference.plan import Plan
from geoseg_cli.inference.runtime import Runtime, StreamPush, check_shape
from geoseg_cli.inference.tta import merge_views

log = logging.getLogger(__name__)

#: Largest tile side (pixels, before the halo) on a CPU and on a GPU; a runtime with row
#: streams feeds a quarter of this square at a time instead.
CPU_TILE, GPU_TILE = 1024, 2048
#: Without a ``tile`` from the user, tiles are strips up to this many tile sides wide
#: (a whole row of a raster up to that width): fewer seams, so less halo recomputed.
STRIP_TILES = 4
#: Context (pixels) read around each tile on the sides where it meets another tile.
DEFAULT_HALO = 64
#: Windows × views per head pass on a CPU and on a GPU when the user gives no batch size.
CPU_HEAD_BATCH, GPU_HEAD_BATCH = 6, 16

#: ``(rows, cols)`` → scaled input C×H×W float32 over those region pixel spans (the
#: ``(start, stop)`` of each may reach past the raster: reflect padding).
RegionReader = Callable[[tuple[int, int], tuple[int, int]], np.ndarray]


def split_span(start: int, stop: int, size: int, unit: int) -> list[tuple[int, int]]:
    """Cut ``[start, stop)`` into the fewest near-equal pieces of at most ``size`` pixels.

    Args:
        start: First pixel.
        stop: End (``stop - start`` a multiple of ``unit``).
        size: Largest piece (a multiple of ``unit``).
        unit: Every piece is a multiple of it long (the output stride).
    """
    units, per_piece = (stop - start) // unit, size // unit
    count = -(-units // per_piece)
    base, extra = divmod(units, count)
    spans, position = [], start
    for i in range(count):
        length = (base + (i < extra)) * unit
        spans.append((position, position + length))
        position += length
    return spans


def stream_rows(tile: int, width: int, unit: int) -> int:
    """Rows fed to a feature stream at a time over an area ``width`` px wide.

    About a quarter of a tile's pixels (thin runs stay in cache), a multiple of ``unit``.
    """
    return max(unit, tile * tile // (4 * width) // unit * unit)


@dataclass
class _Strip:
    """Features of one strip (of rows or of tiles) for every view, rows ``top`` to ``bottom``.

    Attributes:
        top: First region row held (the strip's first row, or later once trimmed).
        bottom: End row of the strip.
        features: Per view, F × (bottom - top)/s × (padded width)/s.
        done: Per column tile, whether its features are computed (all at once for rows).
    """

    top: int
    bottom: int
    features: list[np.ndarray]
    done: list[bool]


class SharedPredictor:
    """Per-window probabilities from backbone features shared by overlapping windows.

    SCG-Net spends nearly all its FLOPs in the backbone, which needs no window, and most of
    the head's multiply-adds are per-position linear maps that need none either. With
    overlapping windows the window engine recomputes them (T/S)² times per pixel and view;
    this engine instead

    1. runs the backbone and the head's projection once per pixel and TTA view over the
       padded area the grid covers. A runtime with row streams feeds the area's full-width
       rows top to bottom through the network (the features of one pass over the whole
       area); otherwise the area is cut into tiles of at most ``tile`` px, each read with up
       to ``halo`` px of its neighbours as context, the view applied to the whole tile;
    2. keeps the features of the rows later windows still need;
    3. per window crops its feature patch in each view, runs only the window-dependent rest
       of the head (many windows per pass) up to its logits, maps them back to the original
       orientation and averages the views' probabilities after upsampling and softmax.

    Windows start on the feature grid (the stride is rounded, :meth:`grid_stride`), and a
    dihedral view maps that grid onto itself, so the patch of a window in a view is the view
    of its patch. The features differ from the window engine's only near window borders
    (zero padding there, real context here) and near tile seams (``halo`` px of context).
    Features are computed when a window first needs them: areas whose windows hold only
    nodata cost nothing.

    Args:
        runtime: A runtime that runs backbone and head separately.
        plan: The run's plan (grid on the feature grid, views, classes).
        read: Reads scaled input over region pixel spans (reflect padding past the raster).
        batch_size: Windows × views per head pass, rounded down to whole windows (default:
            :data:`CPU_HEAD_BATCH` or :data:`GPU_HEAD_BATCH`).
        tile: Largest tile side in pixels, a multiple of the output stride (default:
            :data:`CPU_TILE` or :data:`GPU_TILE` high and :data:`STRIP_TILES` times that
            wide); with row streams, the strip height.
        halo: Context around inner tile sides in pixels, a multiple of the output stride;
            with row streams, the context rows read where a stream restarts.

    Raises:
        UsageError: The tile or halo is off the feature grid.
    """

    name = "shared"
    needs_band = False

    def __init__(
        self,
        runtime: Runtime,
        plan: Plan,
        read: RegionReader,
        batch_size: int | None = None,
        tile: int | None = None,
        halo: int | None = None,
    ) -> None:
        s = runtime.output_stride
        tile_width = None if tile else STRIP_TILES
        tile = tile or (GPU_TILE if runtime.on_gpu else CPU_TILE)
        halo = DEFAULT_HALO if halo is None else halo
        if tile < s or tile % s or halo < 0 or halo % s:
            raise UsageError(
                f"tile {tile} and halo {halo} must be multiples of {s} (tile at least {s})"
            )
        grid, views = plan.grid, plan.views
        self.runtime = runtime
        self.plan = plan
        self.read = read
        self.tile, self.halo, self.unit = tile, halo, s
        batch = batch_size or (GPU_HEAD_BATCH if runtime.on_gpu else CPU_HEAD_BATCH)
        self.batch_size = max(1, batch // len(views)) * len(views)
        (top, bottom), (left, right) = grid.padded_rows, grid.padded_cols
        self._bounds = (top, bottom, left, right)
        self._row_spans = split_span(top, bottom, tile, s)
        self._col_spans = split_span(left, right, tile * (tile_width or 1), s)
        self._col_starts = [a for a, _ in self._col_spans]
        self._band_tops = [int(r) for r in grid.row_starts]
        self._band = 0
        self._strips: list[_Strip] = []
        self._next_strip = 0
        self._stream_rows = stream_rows(tile, right - left, s)
        self._pushes: list[StreamPush] = []
        self._fed = top  # next region row fed to the streams
        self._made: list[list[np.ndarray]] = []  # per view, feature rows not yet placed
        self._made_top = top  # region row of their first row

    @staticmethod
    def grid_stride(window: int, stride: int, unit: int) -> int:
        """The stride the engine runs.

        The nearest multiple of the output stride ``unit`` (halves up), between ``unit`` and the
        window.
        """
        return min(window, max(unit, (stride + unit // 2) // unit * unit))

    @property
    def source_rows(self) -> int:
        """Raster rows one pass reads at most (a tile with its halo)."""
        return max(self.plan.grid.window, self.tile + 2 * self.halo)

    def memory_bytes(self) -> int:
        """Working memory besides the model's activations.

        Cached features, one backbone pass's input and features per view (a run of
        streamed rows or a tile with its halo), one head pass, one window's probabilities.
        """
        grid, s = self.plan.grid, self.unit
        views, classes = len(self.plan.views), self.plan.num_classes
        channels, features = len(self.plan.bands), self.runtime.feature_channels
        t, width = grid.window, self.plan.padded_width
        cache = views * features * (t + self.tile) // s * (width // s) * 4
        a, b = self._col_spans[0]
        tile_pixels = (self.tile + 2 * self.halo) * (b - a + 2 * self.halo)
        pixels = self._stream_rows * width if self.runtime.streams else tile_pixels
        pass_bytes = 2 * channels * pixels * 4 + 2 * features * (pixels // s**2) * 4
        head = self.batch_size * (features + classes) * (t // s) ** 2 * 4
        probabilities = (1 + 2 * views) * classes * t * t * 4
        return cache + pass_bytes + head + probabilities

    def describe(self) -> str:
        """The engine part of the plan log."""
        grid, (_, _, left, right) = self.plan.grid, self._bounds
        if self.runtime.streams:
            backbone = f"streamed over {right - left} px wide rows, {self._stream_rows} at a time"
        else:
            tiles = len(self._row_spans) * len(self._col_spans)
            (a, b), (c, d) = self._row_spans[0], self._col_spans[0]
            backbone = f"on {tiles} tile(s) of {b - a}×{d - c} px (+{self.halo} px context)"
        images = grid.count * len(self.plan.views)
        return (
            f"shared engine, backbone once per pixel and view {backbone}, head on at most "
            f"{images} windows in passes of <= {self.batch_size}"
        )

    def __call__(self, band: np.ndarray | None, offsets: Sequence[int]) -> Iterator[np.ndarray]:
        """Probabilities (K×T×T float32) of the windows at ``offsets`` of the next row band.

        Args:
            band: Unused: the streams or tiles read their own pixels through ``read``.
            offsets: Column offsets of the windows, relative to the padded band.
        """
        top = self._band_tops[self._band]
        self._band += 1
        offsets = [int(o) for o in offsets]
        if offsets:
            self._advance(top)
        views = self.plan.views
        return merge_views(
            len(offsets),
            views,
            self.batch_size,
            lambda i, v: views[v].apply(self._patch(v, top, offsets[i])),
            self._forward,
            self.runtime.probabilities,
        )

    def _advance(self, top: int) -> None:
        """Drop features above row ``top`` and allocate strips down to ``top + T``."""
        bottom = top + self.plan.grid.window
        self._strips = [s for s in self._strips if s.bottom > top]
        if self._strips and self._strips[-1].bottom >= bottom:
            return
        for strip in self._strips:  # free the rows no later band needs before allocating
            if strip.top < top:
                cut = (top - strip.top) // self.unit
                strip.features = [np.ascontiguousarray(f[:, cut:]) for f in strip.features]
                strip.top = top
        width = (self._bounds[3] - self._bounds[2]) // self.unit
        channels = self.runtime.feature_channels
        while not self._strips or self._strips[-1].bottom < bottom:
            a, b = self._row_spans[self._next_strip]
            self._next_strip += 1
            if b <= top:
                continue
            a = max(a, top)
            rows = (b - a) // self.unit
            features = [np.empty((channels, rows, width), np.float32) for _ in self.plan.views]
            self._strips.append(_Strip(a, b, features, [False] * len(self._col_spans)))

    def _patch(self, view: int, top: int, offset: int) -> np.ndarray:
        """The F × T/s × T/s features of one window (original orientation) in a view."""
        s, t = self.unit, self.plan.grid.window
        left = self._bounds[2]
        first = bisect.bisect_right(self._col_starts, left + offset) - 1
        last = bisect.bisect_left(self._col_starts, left + offset + t)
        pieces = []
        for strip in self._strips:
            if strip.bottom <= top or strip.top >= top + t:
                continue
            for j in range(first, last):
                if not strip.done[j]:
                    self._compute(strip, j)
            rows = slice(
                (max(top, strip.top) - strip.top) // s,
                (min(top + t, strip.bottom) - strip.top) // s,
            )
            pieces.append(strip.features[view][:, rows, offset // s : (offset + t) // s])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def _compute(self, strip: _Strip, j: int) -> None:
        """Features of tile (strip, column j) in every view.

        The whole strip from the row streams when the runtime has them, else the tile alone.
        """
        if self.runtime.streams:
            self._compute_rows(strip)
        else:
            self._compute_tile(strip, j)

    def _compute_rows(self, strip: _Strip) -> None:
        """Feed the row streams until they have made the strip's rows; place those."""
        s = self.unit
        top, bottom, left, right = self._bounds
        if not self._pushes or self._fed < strip.top - self.halo:
            # (re)start: at the area's top, or after rows no window needed, with up to
            # ``halo`` rows of context (as a tile has)
            self._fed = self._made_top = max(top, strip.top - self.halo)
            area = (bottom - self._fed, right - left)
            self._pushes = [self.runtime.feature_stream(v, *area) for v in self.plan.views]
            self._made = [[] for _ in self.plan.views]
        while (
            self._made_top + min(sum(m.shape[1] for m in made) for made in self._made) * s
            < strip.bottom
        ):
            end = min(self._fed + self._stream_rows, bottom)
            pixels = self.read((self._fed, end), (left, right))
            for push, made in zip(self._pushes, self._made, strict=True):
                made.append(push(pixels, end == bottom))
            self._fed = end
        for made, target in zip(self._made, strip.features, strict=True):
            row, kept = self._made_top, []  # piece by piece: no copy of all the rows
            for piece in made:
                stop = row + piece.shape[1] * s
                a, b = max(row, strip.top), min(stop, strip.bottom)
                if a < b:
                    target[:, (a - strip.top) // s : (b - strip.top) // s] = piece[
                        :, (a - row) // s : (b - row) // s
                    ]
                if stop > strip.bottom:
                    kept.append(piece[:, (max(row, strip.bottom) - row) // s :])
                row = stop
            made[:] = kept
        self._made_top = strip.bottom
        strip.done = [True] * len(strip.done)

    def _compute_tile(self, strip: _Strip, j: int) -> None:
        """Run the backbone on tile (strip, column j) in every view."""
        s = self.unit
        top, bottom, left, right = self._bounds
        (a, b), (x0, x1) = (strip.top, strip.bottom), self._col_spans[j]
        # Context from the neighbouring tiles only, never past the padded area: tiled
        # features then equal one pass over the whole area once the halo covers the
        # backbone's receptive field.
        above, below = min(self.halo, a - top), min(self.halo, bottom - b)
        before, after = min(self.halo, x0 - left), min(self.halo, right - x1)
        pixels = self.read((a - above, b + below), (x0 - before, x1 + after))
        rows = slice(above // s, (above + b - a) // s)
        cols = slice(before // s, (before + x1 - x0) // s)
        for view, target in zip(self.plan.views, strip.features, strict=True):
            viewed = np.ascontiguousarray(view.apply(pixels))[np.newaxis]
            features = view.invert(self.runtime.features(viewed)[0])
            target[:, :, (x0 - left) // s : (x1 - left) // s] = features[:, rows, cols]
        strip.done[j] = True

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        logits = self.runtime.head_logits(np.ascontiguousarray(batch, dtype=np.float32))
        expected = (batch.shape[0], self.plan.num_classes, *batch.shape[2:])
        what = f"head logits for features {batch.shape}"
        return check_shape(logits, expected, what, "export the model again or use --engine window")
