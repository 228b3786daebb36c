"""Matching clusters to classes before scoring (``geoseg evaluate --match hungarian``).

An unsupervised cluster map has arbitrary ids: cluster 3 may be the buildings. Hungarian
matching pairs each reference class with at most one cluster, and each cluster with at most
one class, so that the matched pixels (the diagonal after relabelling) are as many as
possible. Clusters left without a class (more clusters than classes) are not merged into
a class: their pixels count as errors of their reference class ("no valid prediction",
as a prediction's nodata does), so they lower OA, recall, F1 and IoU and are nobody's false
positive. Classes left without a cluster (fewer clusters than classes) get recall 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geoseg_cli.metrics import Metrics

#: ``--match`` methods.
MATCH_METHODS = ("hungarian",)


def linear_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of rows to columns, each used at most once.

    The Hungarian method in its shortest-augmenting-path form with dual potentials
    (Kuhn–Munkres; O(n²·m) for n ≤ m): rows are added one at a time, and each is joined to
    the matching by a shortest alternating path on the reduced costs. A rectangular matrix
    assigns min(rows, columns) pairs, as ``scipy.optimize.linear_sum_assignment`` does.

    Args:
        cost: n×m finite costs.

    Returns:
        (row indexes, column indexes) of the pairs, sorted by row.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost must be finite")
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    # 1-based rows and columns; column 0 is the virtual start of each augmenting path
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # row matched to each column (0: none)
    for row in range(1, n + 1):
        owner[0] = row
        column = 0
        slack = np.full(m + 1, np.inf)
        previous = np.zeros(m + 1, dtype=np.int64)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[column] = True
            current = owner[column]
            free = ~used[1:]
            reduced = cost[current - 1] - u[current] - v[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            previous[1:][better] = column
            candidates = np.where(free, slack[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[owner[used]] += delta
            v[used] -= delta
            slack[1:][free] -= delta
            column = nxt
            if owner[column] == 0:
                break
        while column:
            back = previous[column]
            owner[column] = owner[back]
            column = back
    cols = np.nonzero(owner[1:])[0]
    rows = owner[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def match_clusters(contingency: np.ndarray) -> np.ndarray:
    """The class of each cluster under Hungarian matching.

    Args:
        contingency: C×k pixel counts, rows reference classes, columns clusters.

    Returns:
        k class ids, -1 for clusters matched to no class.
    """
    contingency = np.asarray(contingency)
    rows, cols = linear_assignment(-contingency.astype(np.float64))
    classes = np.full(contingency.shape[1], -1, dtype=np.int64)
    classes[cols] = rows
    return classes


@dataclass
class MatchedMetrics(Metrics):
    """Scores after matching clusters to classes.

    Attributes:
        clusters: Cluster names (from the cluster map's tags, else ``cluster_<id>``).
        cluster_classes: Class id of each cluster, -1 when unmatched.
        cluster_pixels: Scored pixels of each cluster.
        method: The matching method.
    """

    clusters: list[str] = field(default_factory=list)
    cluster_classes: list[int] = field(default_factory=list)
    cluster_pixels: list[int] = field(default_factory=list)
    method: str = "hungarian"

    def to_dict(self) -> dict[str, Any]:
        """:meth:`Metrics.to_dict` plus ``match``: the method and each cluster's class."""
        doc = super().to_dict()
        doc["match"] = {
            "method": self.method,
            "clusters": [
                {"cluster": name, "class": self.classes[c] if c >= 0 else None, "pixels": n}
                for name, c, n in zip(
                    self.clusters, self.cluster_classes, self.cluster_pixels, strict=True
                )
            ],
        }
        return doc

    def to_table(self) -> str:
        """The table of :meth:`Metrics.to_table` after the cluster → class lines."""
        width = max((len(name) for name in self.clusters), default=0)
        lines = [f"{self.method} matching (unmatched clusters count as errors):"]
        for name, c, n in zip(
            self.clusters, self.cluster_classes, self.cluster_pixels, strict=True
        ):
            target = self.classes[c] if c >= 0 else "(unmatched)"
            lines.append(f"  {name:<{width}} -> {target}  ({n} px)")
        return "\n".join(lines) + "\n" + super().to_table()


def matched_metrics(
    counts: np.ndarray,
    num_classes: int,
    classes: Sequence[str] | None,
    clusters: Sequence[str] | None,
    exclude_from_mean: Sequence[int] = (),
    ignore_index: int | None = 255,
    boundary_erosion: int = 0,
) -> MatchedMetrics:
    """Scores of a cluster map after Hungarian matching.

    Args:
        counts: Reference × prediction counts as :class:`~geoseg_cli.metrics.ConfusionMatrix`
            holds them (N×(N+1), N ≥ ``num_classes``; the last column counts pixels without
            a valid prediction). Rows from ``num_classes`` on must be empty.
        num_classes: Reference classes C.
        classes: Their names (default ``class_<id>``).
        clusters: Cluster names (default ``cluster_<id>``); there are at least as many
            clusters as predicted ids.
        exclude_from_mean: Class ids left out of mF1 and mIoU.
        ignore_index: Label value that was not counted.
        boundary_erosion: Erosion radius used.

    Raises:
        ValueError: Reference labels outside the ``num_classes`` classes.
    """
    size = counts.shape[0]
    outside = np.nonzero(counts[num_classes:].sum(axis=1))[0]
    if outside.size:
        values = (outside[:5] + num_classes).tolist()
        raise ValueError(f"label values {values} are outside the {num_classes} classes")
    k = max(
        len(clusters or ()), int(np.nonzero(counts[:, :size].sum(axis=0))[0].max(initial=-1)) + 1
    )
    contingency = np.zeros((num_classes, k), dtype=np.int64)
    width = min(k, size)
    contingency[:, :width] = counts[:num_classes, :width]
    cluster_class = match_clusters(contingency)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    matched = cluster_class >= 0
    confusion[:, cluster_class[matched]] = contingency[:, matched]
    unpredicted = counts[:num_classes, size] + contingency[:, ~matched].sum(axis=1)
    names = list(classes) if classes is not None else [f"class_{i}" for i in range(num_classes)]
    cluster_names = list(clusters or ())
    cluster_names += [f"cluster_{i}" for i in range(len(cluster_names), k)]
    return MatchedMetrics(
        classes=names,
        confusion=confusion,
        unpredicted=unpredicted,
        ignore_index=ignore_index,
        exclude_from_mean=sorted(set(exclude_from_mean)),
        boundary_erosion=boundary_erosion,
        clusters=cluster_names,
        cluster_classes=cluster_class.tolist(),
        cluster_pixels=contingency.sum(axis=0).tolist(),
    )
