"""Sparse graphs over a grid of pixel cells: 8-neighbour edges plus top-k affinity edges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Affinity edges per node.
KNN = 8
#: The search window of the affinity edges reaches this many candidate steps each way.
SEARCH_RADIUS = 4
#: Nodes between candidates of the search window.
SEARCH_DILATION = 3
#: Candidate distances computed at once (bounds the memory of a band of rows).
BAND_ELEMENTS = 1 << 20

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass
class PixelGraph:
    """Directed edges (each undirected edge appears both ways) with affinities.

    Attributes:
        src: Source node of each edge (row-major node index ``row · w + col``).
        dst: Target node of each edge.
        weight: Affinity of each edge, in (0, 1], float32.
        num_nodes: h·w.
    """

    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    num_nodes: int


def search_offsets(
    radius: int = SEARCH_RADIUS, dilation: int = SEARCH_DILATION
) -> list[tuple[int, int]]:
    """Candidate offsets of the affinity edges: a dilated square window minus its 3×3 centre."""
    steps = range(-radius * dilation, radius * dilation + 1, dilation)
    return [(dy, dx) for dy in steps for dx in steps if max(abs(dy), abs(dx)) > 1]


def _shifted(padded: np.ndarray, pad: int, rows: slice, width: int, dy: int, dx: int):
    """Rows ``rows`` of the grid moved by (dy, dx), from an array padded by ``pad``."""
    return padded[pad + rows.start + dy : pad + rows.stop + dy, pad + dx : pad + dx + width]


def build_graph(
    features: np.ndarray,
    k: int = KNN,
    radius: int = SEARCH_RADIUS,
    dilation: int = SEARCH_DILATION,
) -> PixelGraph:
    """The sparse graph of an h×w×F grid of scaled node features.

    Nodes are the cells of an h×w grid, each with a feature vector f already divided by its
    affinity scale (colour / σ_c, position / σ_xy, ...), so that the affinity of two nodes is
    the Gaussian exp(−‖f_i − f_j‖² / 2). Edges: the 8 grid neighbours of every node, and its k
    highest-affinity nodes among the candidates of a dilated search window around it (the 8
    neighbours excluded), both ways. The graph holds at most (8 + 2k)·N edges, and building it
    holds O(N·F + N·k) memory plus one band of candidate distances of bounded size: never a
    dense N×N matrix.

    Args:
        features: h×w×F features, divided by their affinity scales.
        k: Affinity edges per node (0: grid edges only).
        radius: Candidate steps of the search window each way.
        dilation: Nodes between candidates.

    Returns:
        The graph; edges leaving the grid are left out.
    """
    height, width, _ = features.shape
    features = features.astype(np.float32, copy=False)
    index = np.arange(height * width, dtype=np.int64).reshape(height, width)
    offsets = search_offsets(radius, dilation) if k > 0 else []
    pad = max([1] + [max(abs(dy), abs(dx)) for dy, dx in offsets])
    padded = np.pad(features, ((pad, pad), (pad, pad), (0, 0)))
    inside = np.pad(np.ones((height, width), dtype=bool), pad)
    padded_index = np.pad(index, pad)
    band = max(1, BAND_ELEMENTS // max(1, width * max(len(offsets), len(NEIGHBOURS))))
    sources, targets, distances = [], [], []
    for top in range(0, height, band):
        rows = slice(top, min(top + band, height))
        here = features[rows]
        for table, keep in ((NEIGHBOURS, None), (offsets, k)):
            if not table:
                continue
            dist = np.stack(
                [
                    ((_shifted(padded, pad, rows, width, dy, dx) - here) ** 2).sum(-1)
                    for dy, dx in table
                ]
            )
            valid = np.stack([_shifted(inside, pad, rows, width, dy, dx) for dy, dx in table])
            other = np.stack([_shifted(padded_index, pad, rows, width, dy, dx) for dy, dx in table])
            if keep is not None and keep < len(table):
                dist = np.where(valid, dist, np.inf)
                best = np.argpartition(dist, keep - 1, axis=0)[:keep]
                dist = np.take_along_axis(dist, best, 0)
                valid = np.take_along_axis(valid, best, 0)
                other = np.take_along_axis(other, best, 0)
            source = np.broadcast_to(index[rows], valid.shape)
            sources.append(source[valid])
            targets.append(other[valid])
            distances.append(dist[valid])
            if keep is not None:  # affinity edges both ways
                sources.append(other[valid])
                targets.append(source[valid])
                distances.append(dist[valid])
    weight = np.exp(-0.5 * np.concatenate(distances)).astype(np.float32)
    return PixelGraph(np.concatenate(sources), np.concatenate(targets), weight, height * width)
