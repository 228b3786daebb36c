"""Test-time augmentation: dihedral views of square windows, their inverses, and the view merge."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from geoseg_cli.errors import UsageError

#: TTA set names accepted by :func:`tta_views` (``None`` means no TTA).
TTA_SETS = ("flip", "d4")


@dataclass(frozen=True)
class View:
    """One dihedral view of the last two axes: a left-right flip if ``flip``, then ``k`` turns."""

    name: str
    k: int = 0
    flip: bool = False

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The view of ``x`` (``...×H×W``; with odd ``k`` the result is ``...×W×H``)."""
        if self.flip:
            x = np.flip(x, axis=-1)
        return np.rot90(x, self.k, axes=(-2, -1))

    def invert(self, y: np.ndarray) -> np.ndarray:
        """Map ``y`` computed on the view back to the original orientation."""
        y = np.rot90(y, -self.k, axes=(-2, -1))
        if self.flip:
            y = np.flip(y, axis=-1)
        return y


IDENTITY = View("identity")
HFLIP = View("hflip", flip=True)
VFLIP = View("vflip", k=2, flip=True)


def tta_views(tta: str | None) -> tuple[View, ...]:
    """Views for a TTA set: ``None`` → identity only, ``"flip"`` → 3, ``"d4"`` → 8.

    ``flip`` is the paper's set (identity, horizontal flip, vertical flip); ``d4`` is all
    eight symmetries of the square.

    Raises:
        UsageError: Unknown set name.
    """
    if tta is None:
        return (IDENTITY,)
    if tta == "flip":
        return (IDENTITY, HFLIP, VFLIP)
    if tta == "d4":
        return tuple(
            View(f"rot{90 * k}{'-hflip' if flip else ''}", k=k, flip=flip)
            for flip in (False, True)
            for k in range(4)
        )
    raise UsageError(f"unknown TTA set {tta!r}; use one of {', '.join(TTA_SETS)}")


def merge_views(
    count: int,
    views: tuple[View, ...],
    batch_size: int,
    view_input: Callable[[int, int], np.ndarray],
    forward: Callable[[np.ndarray], np.ndarray],
    merge: Callable[[np.ndarray], np.ndarray],
) -> Iterator[np.ndarray]:
    """Run ``forward`` on every (item, view) input in batches and merge each item's views.

    Every output is mapped back to the original orientation and an item's views are merged
    in view order, so results do not depend on the batch size or on how the views fall
    into batches.

    Args:
        count: Number of items (windows).
        views: The TTA views.
        batch_size: Inputs per ``forward`` call.
        view_input: ``(item, view index)`` → that item's input in the view's orientation.
        forward: Batch of inputs → batch of outputs (``...×H×W``, in the views' orientations).
        merge: V×… outputs of one item, in the original orientation → the item's result.

    Yields:
        One result per item, in order.
    """
    items = [(i, v) for i in range(count) for v in range(len(views))]
    partial: dict[int, list[np.ndarray]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        outputs = forward(np.stack([view_input(i, v) for i, v in chunk]))
        for (i, v), y in zip(chunk, outputs, strict=True):
            partial.setdefault(i, []).append(views[v].invert(y))
            if v == len(views) - 1:
                yield merge(np.stack(partial.pop(i)))


def mean_of_views(outputs: np.ndarray) -> np.ndarray:
    """The mean of V×… view outputs (the TTA mean of probabilities)."""
    return outputs[0] if len(outputs) == 1 else outputs.mean(axis=0, dtype=np.float32)
