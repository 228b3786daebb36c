"""Shared-backbone inference: the backbone runs once per pixel and TTA view, the head per window.

SCG-Net spends about 98 % of its FLOPs in the ResNet backbone, a stack of convolutions with
output stride 16 that needs no window; only the SCG head needs the window, because its
graph spans it, and even most of the head's multiply-adds are per-position linear maps
(GNN1's X·W, the taps of the 3×3 convolution M, L) that need no window either. With
overlapping windows (stride S < window T) the window engine recomputes all of that
(T/S)² times for every pixel and view. The shared engine instead:

1. runs the backbone and the head's projection once per pixel and TTA view over the padded
   area the window grid covers (reflect padding past the raster, as the window engine
   pads). A PyTorch engine streams the area's full-width rows top to bottom through the
   network (:mod:`geoseg_cli.rowstream`): the features of one pass over the whole area in
   each view, with no pixel computed twice. An engine without row streams (ONNX Runtime)
   cuts the area into tiles of at most ``tile`` px a side, multiples of 16, each read with
   up to ``halo`` px of the neighbouring tiles as context; the view is applied to the whole
   tile and the features are mapped back to the original orientation and cropped to it;
2. keeps the features of the rows later windows still need: one strip of rows (a strip of
   tiles) across the padded width, plus what is left of the previous strip;
3. for each window crops its T/16 × T/16 feature patch per view, puts it in the view's
   orientation, runs only the window-dependent rest of the head (many windows per pass) up
   to its logits at feature resolution, maps each view's logits back to the original
   orientation and averages the views' probabilities after upsampling and softmax, as the
   window engine does (:func:`~geoseg_cli.engine.mean_probabilities`).

Window offsets and the stride must be multiples of 16 so that every window starts on the
feature grid (predict's plan rounds them). A dihedral view of an area whose sides are
multiples of 16 maps the feature grid onto itself, so the patch of a window in a view is
the view of its patch. The features differ from the window engine's only near window
borders, where the window engine sees zero padding and the shared engine real context, and
near tile seams, where the shared engine sees ``halo`` px of context (also where streams
restart after rows that no window needs).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geoseg_cli.engine import (
    CHUNK_CELLS,
    FEATURE_STRIDE,
    FeatureEngine,
    StreamPush,
    mean_probabilities,
)
from geoseg_cli.errors import CheckpointError
from geoseg_cli.tta import View
from geoseg_cli.windows import Grid

#: Largest tile side (pixels, before the halo) on a CPU. With glibc keeping freed memory
#: (:mod:`geoseg_cli.allocator`) the backbone runs as fast on large tiles as on small ones,
#: and larger tiles read fewer halo pixels: on a 2-core CPU, stride 224 over a 4096² raster
#: took 12.9 s with 1024-px tiles, 12.1 s with 1536 px and 19.3 s with 512 px (peak RSS
#: 1.2, 1.9 and 0.8 GiB).
CPU_TILE = 1024
#: Largest tile side on a GPU, which runs large inputs efficiently (fewer halo pixels).
GPU_TILE = 2048
#: Context (pixels) read around each tile on the sides where it meets another tile. With
#: 64 px a trained resnet50 scg-gcn (T=448) gave the same classes as one seamless tile on
#: 99.95 % of the pixels (96 px: 99.999 %, 32 px: 99.0 %, none: 94.5 %).
DEFAULT_HALO = 64
#: Windows × views per head pass on a CPU when the user gives no batch size (passes hold
#: whole windows: at least one window with all its views). With 448-px windows on a 2-core
#: CPU the head took 2.9, 2.05, 1.8 and 1.9 ms per window and view in passes of 1, 3, 6
#: and 12.
CPU_HEAD_BATCH = 6
#: Windows × views per head pass on a GPU.
GPU_HEAD_BATCH = 16

#: ``(rows, cols)`` → scaled input C×H×W float32 over those region pixel spans (the
#: ``(start, stop)`` of each may reach past the raster: reflect padding).
RegionReader = Callable[[tuple[int, int], tuple[int, int]], np.ndarray]


def feature_channels(engine: object) -> int | None:
    """Feature channels of an engine that can run backbone and head separately, else None."""
    return getattr(engine, "feature_channels", None)


def has_streams(engine: object) -> bool:
    """Whether an engine streams features row by row (``feature_stream``, a PyTorch engine)."""
    return callable(getattr(engine, "feature_stream", None))


def _on_gpu(engine: object) -> bool:
    """Whether an engine runs on CUDA (a PyTorch CUDA device or ONNX Runtime's CUDA
    provider first)."""
    device = getattr(engine, "device", None)
    providers = list(getattr(engine, "providers", None) or [])
    return getattr(device, "type", None) == "cuda" or providers[:1] == ["CUDAExecutionProvider"]


def default_tile(engine: object) -> int:
    """:data:`GPU_TILE` for an engine running on CUDA, else :data:`CPU_TILE`."""
    return GPU_TILE if _on_gpu(engine) else CPU_TILE


def default_head_batch(engine: object) -> int:
    """:data:`GPU_HEAD_BATCH` for an engine running on CUDA, else :data:`CPU_HEAD_BATCH`."""
    return GPU_HEAD_BATCH if _on_gpu(engine) else CPU_HEAD_BATCH


def split_span(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Cut ``[start, stop)`` into the fewest near-equal pieces of at most ``size`` pixels,
    each a multiple of :data:`FEATURE_STRIDE` long.

    Args:
        start: First pixel.
        stop: End (``stop - start`` a multiple of 16).
        size: Largest piece (a multiple of 16).
    """
    units, unit = (stop - start) // FEATURE_STRIDE, size // FEATURE_STRIDE
    count = -(-units // unit)
    base, extra = divmod(units, count)
    spans, position = [], start
    for i in range(count):
        length = (base + (i < extra)) * FEATURE_STRIDE
        spans.append((position, position + length))
        position += length
    return spans


def stream_rows(tile: int, width: int) -> int:
    """Rows fed to a feature stream at a time over an area ``width`` px wide: about a
    quarter of a tile's pixels (thin runs stay in cache: on a 2-core CPU the resnet50 trunk
    streamed 4480-px-wide rows at 0.37 s/Mpx in runs of 64 rows, 0.40 s/Mpx in runs of 224),
    a multiple of 16, at least 16."""
    return max(FEATURE_STRIDE, tile * tile // (4 * width) // FEATURE_STRIDE * FEATURE_STRIDE)


def memory_bytes(
    grid: Grid,
    views: int,
    channels: int,
    features: int,
    classes: int,
    batch_size: int,
    tile: int,
    halo: int,
    streamed: bool = False,
) -> int:
    """Working memory of the shared engine besides the model's activations: cached
    features, one backbone pass's input and features per view (a run of streamed rows or a
    tile with its halo), one head pass's inputs and logits, one window's probabilities and
    the chunks they are computed in."""
    t, s = grid.window, FEATURE_STRIDE
    width = grid.padded_cols[1] - grid.padded_cols[0]
    cache = views * features * (t + tile) // s * (width // s) * 4
    side = tile + 2 * halo
    pixels = stream_rows(tile, width) * width if streamed else side * side
    pass_bytes = 2 * channels * pixels * 4 + 2 * features * (pixels // s**2) * 4
    head = max(batch_size, views) * (features + classes) * (t // s) ** 2 * 4
    probabilities = (1 + 2 * views * min(CHUNK_CELLS * s, t) / t) * classes * t * t * 4
    return cache + pass_bytes + head + int(probabilities)


@dataclass
class _Strip:
    """Features of one strip (of rows or of tiles) for every view, from row ``top`` to row
    ``bottom``.

    Attributes:
        top: First region row held (the strip's first row, or later once trimmed).
        bottom: End row of the strip.
        features: Per view, F × (bottom - top)/16 × (padded width)/16.
        done: Per column tile, whether its features are computed (all at once for rows).
    """

    top: int
    bottom: int
    features: list[np.ndarray]
    done: list[bool]


class SharedPredictor:
    """Per-window probabilities from shared backbone features (a predict ``WindowPredictor``).

    Called once per row band of ``grid``, top to bottom, as predict's pipeline does (also for
    bands without windows to predict); it reads the pixels it needs itself through
    ``read``. Features are computed when a window first needs them, so areas whose windows
    hold only nodata cost nothing: tiles that no window needs are never run, and row
    streams restart (with ``halo`` rows of context) below strips that no window needed.

    Args:
        engine: A runtime that runs backbone and head separately.
        grid: The window grid (window, stride and offsets multiples of 16).
        views: TTA views.
        read: Reads scaled input over region pixel spans (reflect padding past the raster).
        batch_size: Windows × views per head pass (rounded down to whole windows, at least
            one).
        tile: Largest tile side in pixels (a multiple of 16); with row streams, the strip
            height, and a quarter of its square is fed at a time (:func:`stream_rows`).
        halo: Context around inner tile sides in pixels (a multiple of 16); with row
            streams, the context rows read where a stream restarts.

    Raises:
        ValueError: The grid, tile or halo is not on the 16-px feature grid.
    """

    def __init__(
        self,
        engine: FeatureEngine,
        grid: Grid,
        views: Sequence[View],
        read: RegionReader,
        batch_size: int = CPU_HEAD_BATCH,
        tile: int = CPU_TILE,
        halo: int = DEFAULT_HALO,
    ) -> None:
        s = FEATURE_STRIDE
        (top, bottom), (left, right) = grid.padded_rows, grid.padded_cols
        if any(v % s for v in (grid.window, grid.stride, top, left, tile, halo)) or tile < s:
            raise ValueError(
                f"window {grid.window}, stride {grid.stride}, grid start ({top}, {left}), tile "
                f"{tile} and halo {halo} must be multiples of {s} (tile at least {s})"
            )
        self.engine = engine
        # where the probabilities are computed: a PyTorch engine's device, else the CPU
        device = getattr(engine, "device", None)
        self._device = device if isinstance(device, torch.device) else torch.device("cpu")
        self.grid = grid
        self.views = tuple(views)
        self.read = read
        self.batch_size = batch_size
        self.halo = halo
        self._bounds = (top, bottom, left, right)
        self._row_spans = split_span(top, bottom, tile)
        self._col_spans = split_span(left, right, tile)
        self._col_starts = [a for a, _ in self._col_spans]
        self._band_tops = [int(r) for r in grid.row_starts]
        self._band = 0
        self._strips: list[_Strip] = []
        self._next_strip = 0
        self._streamed = has_streams(engine)
        self._stream_rows = stream_rows(tile, right - left)
        self._pushes: list[StreamPush] = []
        self._fed = top  # next region row fed to the streams
        self._made: list[list[np.ndarray]] = []  # per view, feature rows not yet placed
        self._made_top = top  # region row of their first row

    def __call__(self, band: np.ndarray | None, offsets: Sequence[int]) -> Iterator[np.ndarray]:
        """Probabilities (K×T×T float32) of the windows at ``offsets`` of the next row band.

        Args:
            band: Unused (None from predict's pipeline): the streams or tiles read their
                own pixels through ``read``.
            offsets: Column offsets of the windows, relative to the padded band.
        """
        top = self._band_tops[self._band]
        self._band += 1
        offsets = [int(o) for o in offsets]
        if offsets:
            self._advance(top)
        return self._windows(top, offsets)

    def _windows(self, top: int, offsets: list[int]) -> Iterator[np.ndarray]:
        views = self.views
        per_pass = max(1, self.batch_size // len(views))
        for start in range(0, len(offsets), per_pass):
            chunk = offsets[start : start + per_pass]
            patches = [v.apply(self._patch(i, top, o)) for o in chunk for i, v in enumerate(views)]
            logits = self._forward(np.stack(patches))
            for first in range(0, len(logits), len(views)):
                window = logits[first : first + len(views)]
                upright = np.stack([v.invert(y) for v, y in zip(views, window, strict=True)])
                logits_on_device = torch.from_numpy(upright).to(self._device)
                yield mean_probabilities(logits_on_device).cpu().numpy()

    def _advance(self, top: int) -> None:
        """Drop features above row ``top`` and allocate strips down to ``top + T``."""
        bottom = top + self.grid.window
        self._strips = [s for s in self._strips if s.bottom > top]
        if self._strips and self._strips[-1].bottom >= bottom:
            return
        for strip in self._strips:  # free the rows no later band needs before allocating
            if strip.top < top:
                cut = (top - strip.top) // FEATURE_STRIDE
                strip.features = [np.ascontiguousarray(f[:, cut:]) for f in strip.features]
                strip.top = top
        width = (self._bounds[3] - self._bounds[2]) // FEATURE_STRIDE
        channels = self.engine.feature_channels
        while not self._strips or self._strips[-1].bottom < bottom:
            a, b = self._row_spans[self._next_strip]
            self._next_strip += 1
            if b <= top:
                continue
            a = max(a, top)
            rows = (b - a) // FEATURE_STRIDE
            features = [np.empty((channels, rows, width), np.float32) for _ in self.views]
            self._strips.append(_Strip(a, b, features, [False] * len(self._col_spans)))

    def _patch(self, view: int, top: int, offset: int) -> np.ndarray:
        """The F × T/16 × T/16 features of one window (original orientation) in a view."""
        s, t = FEATURE_STRIDE, self.grid.window
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
        """Features of tile (strip, column j) in every view: the whole strip from the row
        streams when the engine has them, else the tile alone."""
        if self._streamed:
            self._compute_rows(strip)
        else:
            self._compute_tile(strip, j)

    def _compute_rows(self, strip: _Strip) -> None:
        """Feed the row streams until they have made the strip's rows; place those."""
        s = FEATURE_STRIDE
        top, bottom, left, right = self._bounds
        if not self._pushes or self._fed < strip.top - self.halo:
            # (re)start: at the area's top, or after rows no window needed, with up to
            # ``halo`` rows of context (as a tile has)
            self._fed = self._made_top = max(top, strip.top - self.halo)
            area = (bottom - self._fed, right - left)
            self._pushes = [self.engine.feature_stream(v, *area) for v in self.views]
            self._made = [[] for _ in self.views]
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
        s = FEATURE_STRIDE
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
        for view, target in zip(self.views, strip.features, strict=True):
            viewed = np.ascontiguousarray(view.apply(pixels))[np.newaxis]
            features = view.invert(self.engine.features(viewed)[0])
            target[:, :, (x0 - left) // s : (x1 - left) // s] = features[:, rows, cols]
        strip.done[j] = True

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        logits = self.engine.head_logits(np.ascontiguousarray(batch, dtype=np.float32))
        expected = (batch.shape[0], self.engine.info.model.num_classes, *batch.shape[2:])
        if logits.shape != expected:
            raise CheckpointError(
                f"the model's head returned logits of shape {logits.shape} for features "
                f"{batch.shape} (expected {expected}); export the model again or use "
                "--engine window"
            )
        return logits
