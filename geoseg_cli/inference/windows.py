"""Pure window arithmetic of sliding-window inference: grids, reflect indexes, blending weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Smallest blending weight, relative to the window centre (keeps weights > 0 everywhere).
WEIGHT_FLOOR = 1e-3


def margin(window: int, stride: int, align: int = 1) -> int:
    """Pixels the grid starts before the raster.

    Half the overlap ``T - S``, rounded down to a multiple of ``align`` (so that window offsets
    stay multiples of it) but not to zero when the windows overlap (the raster's first pixels
    stay off the first window's border).
    """
    half = (window - stride) // 2
    return max(half // align * align, min(align, window - stride))


def window_starts(size: int, window: int, stride: int, align: int = 1) -> np.ndarray:
    """Start offsets (may be negative) of windows covering ``size`` pixels along one axis.

    The first window starts at ``-margin``; windows step by ``stride`` until the last one
    covers the last pixel with at least ``margin`` pixels of context after it (or reaches
    past it, for rasters smaller than the window).

    Args:
        size: Raster length along the axis (pixels), at least 1.
        window: Window size ``T``.
        stride: Step ``S`` with ``1 <= S <= T``.
        align: The margin is rounded down to a multiple of it (with ``T`` and ``S``
            multiples of ``align``, every offset is one).

    Returns:
        int64 array of start offsets, in increasing order.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    m = margin(window, stride, align)
    count = max(1, -(-(size - window + 2 * m) // stride) + 1)
    return np.arange(count, dtype=np.int64) * stride - m


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indexes for positions ``start..stop-1`` of an axis of length ``size``.

    Positions past both ends are reflected (without repeating the edge pixel), as
    ``numpy.pad`` mode ``"reflect"`` does, repeatedly for positions far outside.
    """
    positions = np.arange(start, stop, dtype=np.int64)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded)


def weights_1d(window: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """Smooth 1-D blending weights: a Hann (raised cosine) window lifted by ``floor``.

    Sampled at pixel centres, so the weights are symmetric, peak near the middle and are
    never zero (at least ``floor``): every pixel a window covers counts a little.
    """
    centres = (np.arange(window, dtype=np.float64) + 0.5) / window
    hann = np.sin(np.pi * centres) ** 2
    return (floor + (1.0 - floor) * hann).astype(np.float32)


def weights_2d(window: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """Separable 2-D blending weights (``T×T`` float32), the outer product of :func:`weights_1d`."""
    w = weights_1d(window, floor)
    return np.outer(w, w)


def coverage(starts: np.ndarray, window: int, size: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """Summed 1-D weights of all windows at ``starts`` for each pixel ``0..size-1``.

    Because the 2-D weights are separable and the grid is a full product of row and
    column starts, the summed 2-D weight of a pixel is ``coverage(rows)[y] *
    coverage(cols)[x]``: no per-pixel weight accumulator is needed.
    """
    w = weights_1d(window, floor).astype(np.float64)
    total = np.zeros(size, dtype=np.float64)
    for s in starts:
        lo, hi = max(0, s), min(size, s + window)
        if lo < hi:
            total[lo:hi] += w[lo - s : hi - s]
    return total


@dataclass(frozen=True)
class Grid:
    """The window grid over a ``height × width`` region.

    Windows of size ``T`` step by stride ``S``. The grid starts half the overlap before the
    region (:func:`margin`), so every pixel lies in the central part of some window; windows
    reaching past the region are filled by reflect padding rather than shifted inwards, so
    every window keeps its full size and the grid stays regular.

    Attributes:
        height: Region rows.
        width: Region columns.
        window: Window size ``T``.
        stride: Stride ``S``.
        align: Window offsets are multiples of it when ``T`` and ``S`` are (see
            :func:`window_starts`); 1 puts the grid exactly half the overlap before the region.
    """

    height: int
    width: int
    window: int
    stride: int
    align: int = 1

    @property
    def row_starts(self) -> np.ndarray:
        """Row offsets of the window rows (row bands), relative to the region."""
        return window_starts(self.height, self.window, self.stride, self.align)

    @property
    def col_starts(self) -> np.ndarray:
        """Column offsets of the windows in each row band, relative to the region."""
        return window_starts(self.width, self.window, self.stride, self.align)

    @property
    def count(self) -> int:
        """Number of windows."""
        return len(self.row_starts) * len(self.col_starts)

    @property
    def padded_cols(self) -> tuple[int, int]:
        """Column span ``(start, stop)`` that one row band reads, padding included."""
        cols = self.col_starts
        return int(cols[0]), int(cols[-1]) + self.window

    @property
    def padded_rows(self) -> tuple[int, int]:
        """Row span ``(start, stop)`` that all row bands together read, padding included."""
        rows = self.row_starts
        return int(rows[0]), int(rows[-1]) + self.window

    def finished_rows(self, band: int) -> tuple[int, int]:
        """Region rows ``(start, stop)`` that no window after row band ``band`` touches.

        Row bands are processed top to bottom; after band ``band`` the rows above the next
        band's start are final and can be written.
        """
        rows = self.row_starts
        start = max(0, int(rows[band]))
        stop = int(rows[band + 1]) if band + 1 < len(rows) else self.height
        return start, min(max(stop, 0), self.height)
