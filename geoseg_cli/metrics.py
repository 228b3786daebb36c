"""Segmentation metrics: confusion matrix → OA, per-class precision/recall/F1/IoU, means."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ConfusionMatrix:
    """Accumulates reference × prediction pixel counts, window by window.

    Args:
        num_classes: Number of classes K, or None to grow K to the largest class id seen
            (labels then never fall outside the classes).
        ignore_index: Label value of pixels that do not count (never a class id), or None.

    Attributes:
        counts: K×(K+1) int64 counts; the last column counts labelled pixels that have no
            valid prediction.
    """

    def __init__(self, num_classes: int | None, ignore_index: int | None = 255) -> None:
        self.fixed = num_classes is not None
        self.ignore_index = ignore_index
        size = num_classes or 0
        self.counts = np.zeros((size, size + 1), dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """Current number of classes K."""
        return self.counts.shape[0]

    def update(self, pred: Any, target: Any, mask: Any = None) -> None:
        """Add one window of pixels.

        Args:
            pred: Predicted class ids (any integer array-like; torch tensors are accepted).
                Negative values, the ignore index and ids ≥ K count as "no prediction".
            target: Reference class ids, same shape. Negative values and the ignore index
                are not counted.
            mask: Optional boolean array, same shape: False pixels are not counted.

        Raises:
            ValueError: A reference value lies outside the K classes (message lists them).
        """
        pred = _as_int_array(pred).ravel()
        target = _as_int_array(target).ravel()
        if pred.shape != target.shape:
            raise ValueError(f"prediction and labels differ in size ({pred.size} ≠ {target.size})")
        keep = target >= 0
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        if mask is not None:
            keep &= _as_bool_array(mask).ravel()
        target = target[keep]
        pred = pred[keep]
        if target.size == 0:
            return
        predicted = pred >= 0
        if self.ignore_index is not None:
            predicted &= pred != self.ignore_index
        if not self.fixed:
            largest = max(int(target.max()), int(pred[predicted].max(initial=-1)))
            self._grow(largest + 1)
        k = self.num_classes
        outside = target >= k
        if outside.any():
            values = np.unique(target[outside])[:5].tolist()
            raise ValueError(f"label values {values} are outside the {k} classes")
        pred = np.where(predicted & (pred < k), pred, k)
        self.counts += np.bincount(target * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)

    def merge(self, counts: np.ndarray) -> None:
        """Add counts accumulated elsewhere (e.g. by another process), of the same K."""
        self.counts += counts

    def _grow(self, size: int) -> None:
        k = self.num_classes
        if size <= k:
            return
        grown = np.zeros((size, size + 1), dtype=np.int64)
        grown[:k, :k] = self.counts[:, :k]
        grown[:k, size] = self.counts[:, k]
        self.counts = grown

    def metrics(
        self,
        classes: Sequence[str] | None = None,
        exclude_from_mean: Sequence[int] = (),
        boundary_erosion: int = 0,
    ) -> Metrics:
        """Scores of what was accumulated.

        Args:
            classes: Class names (K of them); default ``class_0`` ... ``class_{K-1}``.
            exclude_from_mean: Class indexes left out of mF1 and mIoU.
            boundary_erosion: Erosion radius used (recorded in the result).
        """
        k = self.num_classes
        names = list(classes) if classes is not None else [f"class_{i}" for i in range(k)]
        if len(names) != k:
            raise ValueError(f"{len(names)} class names for {k} classes")
        return Metrics(
            classes=names,
            confusion=self.counts[:, :k].copy(),
            unpredicted=self.counts[:, k].copy(),
            ignore_index=self.ignore_index,
            exclude_from_mean=sorted(set(exclude_from_mean)),
            boundary_erosion=boundary_erosion,
        )


def _as_int_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(np.int64, copy=False)


def _as_bool_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=bool)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _plain(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


@dataclass
class Metrics:
    """Scores derived from a confusion matrix.

    One implementation serves ``geoseg evaluate`` and the validation pass of ``geoseg train``.
    Conventions (ISPRS benchmark):

    - Rows of the confusion matrix are reference (label) classes, columns predicted classes.
    - Pixels labelled with the ignore index do not count at all.
    - A labelled pixel without a valid prediction (prediction nodata, ignore index or a value
      outside the classes) counts as an error of its reference class: it lowers OA, recall, F1
      and IoU of that class but is nobody's false positive.
    - A per-class score that is 0/0 (class absent from both reference and prediction) is NaN
      and left out of the means; ``exclude_from_mean`` drops classes (e.g. clutter) on purpose.
    - Boundary erosion of radius R ignores every pixel within R px (Euclidean disc) of a pixel
      of another class in the reference.

    Attributes:
        classes: Class names, K of them.
        confusion: K×K counts, rows reference, columns prediction.
        unpredicted: Per reference class, labelled pixels without a valid prediction.
        ignore_index: Label value that was not counted.
        exclude_from_mean: Class indexes left out of mF1 and mIoU.
        boundary_erosion: Erosion radius in pixels (0: none).
    """

    classes: list[str]
    confusion: np.ndarray
    unpredicted: np.ndarray
    ignore_index: int | None = 255
    exclude_from_mean: list[int] = field(default_factory=list)
    boundary_erosion: int = 0

    @property
    def true_positives(self) -> np.ndarray:
        """Correctly predicted pixels per class."""
        return np.diag(self.confusion)

    @property
    def support(self) -> np.ndarray:
        """Counted reference pixels per class (including unpredicted ones)."""
        return self.confusion.sum(axis=1) + self.unpredicted

    @property
    def predicted(self) -> np.ndarray:
        """Counted pixels predicted as each class."""
        return self.confusion.sum(axis=0)

    @property
    def pixels(self) -> int:
        """All counted (labelled, not ignored) pixels."""
        return int(self.support.sum())

    @property
    def oa(self) -> float:
        """Overall accuracy: correct pixels / counted pixels (NaN when nothing counted)."""
        return float(_ratio(self.true_positives.sum(), np.array(self.pixels)))

    @property
    def precision(self) -> np.ndarray:
        """TP / predicted pixels per class."""
        return _ratio(self.true_positives, self.predicted)

    @property
    def recall(self) -> np.ndarray:
        """TP / reference pixels per class."""
        return _ratio(self.true_positives, self.support)

    @property
    def f1(self) -> np.ndarray:
        """2·TP / (2·TP + FP + FN) per class (equals the harmonic mean of P and R)."""
        return _ratio(2 * self.true_positives, self.support + self.predicted)

    @property
    def iou(self) -> np.ndarray:
        """TP / (TP + FP + FN) per class."""
        tp = self.true_positives
        return _ratio(tp, self.support + self.predicted - tp)

    def _mean(self, values: np.ndarray) -> float:
        included = np.ones(len(self.classes), dtype=bool)
        included[self.exclude_from_mean] = False
        chosen = values[included & ~np.isnan(values)]
        return float(chosen.mean()) if chosen.size else float("nan")

    @property
    def mf1(self) -> float:
        """Mean F1 over the included classes with a defined F1."""
        return self._mean(self.f1)

    @property
    def miou(self) -> float:
        """Mean IoU over the included classes with a defined IoU."""
        return self._mean(self.iou)

    def scores(self) -> dict[str, float]:
        """OA, mF1, mIoU and every class's F1 and IoU, flat (a row of ``metrics.csv``)."""
        row = {"oa": self.oa, "mf1": self.mf1, "miou": self.miou}
        for name, f1, iou in zip(self.classes, self.f1, self.iou, strict=True):
            row[f"f1_{name}"] = float(f1)
            row[f"iou_{name}"] = float(iou)
        return row

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (undefined scores are None)."""
        rows = zip(
            self.classes,
            self.precision,
            self.recall,
            self.f1,
            self.iou,
            self.support,
            self.predicted,
            strict=True,
        )
        return {
            "oa": _plain(self.oa),
            "mf1": _plain(self.mf1),
            "miou": _plain(self.miou),
            "pixels": self.pixels,
            "unpredicted": int(self.unpredicted.sum()),
            "ignore_index": self.ignore_index,
            "boundary_erosion": self.boundary_erosion,
            "excluded_from_mean": [self.classes[i] for i in self.exclude_from_mean],
            "classes": [
                {
                    "name": name,
                    "precision": _plain(p),
                    "recall": _plain(r),
                    "f1": _plain(f),
                    "iou": _plain(i),
                    "support": int(s),
                    "predicted": int(n),
                }
                for name, p, r, f, i, s, n in rows
            ],
            "confusion_matrix": self.confusion.tolist(),
        }

    def to_table(self) -> str:
        """A human-readable report: per-class scores, then the means and OA."""

        def fmt(value: float) -> str:
            return "     -" if np.isnan(value) else f"{value:6.4f}"

        width = max(len("class"), *(len(c) for c in self.classes))
        lines = [f"{'class':<{width}}  precision  recall      F1     IoU    support"]
        for i, name in enumerate(self.classes):
            mark = " (excluded from means)" if i in self.exclude_from_mean else ""
            lines.append(
                f"{name:<{width}}     {fmt(self.precision[i])}  {fmt(self.recall[i])}  "
                f"{fmt(self.f1[i])}  {fmt(self.iou[i])}  {int(self.support[i]):9d}{mark}"
            )
        notes = [f"{self.pixels} pixels"]
        if self.boundary_erosion:
            notes.append(f"boundary erosion {self.boundary_erosion} px")
        if self.unpredicted.any():
            notes.append(f"{int(self.unpredicted.sum())} without prediction")
        lines.append(
            f"OA {fmt(self.oa).strip()}  mF1 {fmt(self.mf1).strip()}  "
            f"mIoU {fmt(self.miou).strip()}  ({', '.join(notes)})"
        )
        return "\n".join(lines)


def disc_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) ≠ (0, 0) with dy² + dx² ≤ radius², half of them (dy, dx) > (0, 0).

    Being "within R of another class" is symmetric, so half the disc suffices when both
    ends of each offset are marked.
    """
    return [
        (dy, dx)
        for dy in range(0, radius + 1)
        for dx in range(-radius, radius + 1)
        if (dy > 0 or dx > 0) and dy * dy + dx * dx <= radius * radius
    ]


def boundary_mask(labels: np.ndarray, radius: int, ignore_index: int | None = 255) -> np.ndarray:
    """Pixels within ``radius`` px (Euclidean) of a pixel of another class (ISPRS erosion).

    Only class/class borders count: ignore-index and negative values (nodata) are no class,
    and nothing lies beyond the array's edges. To erode a window of a larger raster, pass
    the window with a halo of ``radius`` pixels (filled with -1 beyond the raster) and crop.

    Args:
        labels: H×W integer class ids.
        radius: Erosion radius R ≥ 0 (0 gives an all-False mask).
        ignore_index: Label value that is not a class.

    Returns:
        H×W boolean mask, True where the pixel should not be scored.
    """
    labels = np.asarray(labels).astype(np.int64)
    if ignore_index is not None:
        labels = np.where(labels == ignore_index, -1, labels)
    height, width = labels.shape
    padded = np.pad(labels, radius, constant_values=-1)
    boundary = np.zeros((height + 2 * radius, width + 2 * radius), dtype=bool)
    for dy, dx in disc_offsets(radius):
        # pixel p = (y, x) in the core-and-halo frame versus q = p + (dy, dx)
        a = padded[radius : radius + height, radius : radius + width]
        b = padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
        differs = (a != b) & (a >= 0) & (b >= 0)
        boundary[radius : radius + height, radius : radius + width] |= differs
        boundary[radius + dy : radius + dy + height, radius + dx : radius + dx + width] |= differs
    return boundary[radius : radius + height, radius : radius + width]
