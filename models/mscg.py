"""MSCG-Net's multi-view head: one SCG head run on three views of the window, summed.

The SCG authors' multi-view form (MSCG-Net) runs the same SCG block and graph layers
(shared weights) on the feature map F, on F transposed (rows ↔ columns) and on F mirrored
left ↔ right. Each view's node logits, its own residual Ẑ included, are mapped back to the
original orientation and the three are summed; in training the three views' L_kl and L_dl
are summed too.

Every view is its own inverse, and the head's projection is per position, so the views can
be taken of the projected features: :meth:`MultiViewSCGHead.decode` of a window's
projected features is the sum above, and predict's shared engine and row streams, which
project once and decode per window, work unchanged.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable

import torch

from models.net import SCGHead, SegmentationOutput

View = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


#: The three views of MSCG-Net: F, F transposed, F mirrored horizontally (each its own
#: inverse).
VIEWS: tuple[View, ...] = (_identity, _transpose, _mirror)


class MultiViewSCGHead(SCGHead):
    """An :class:`SCGHead` whose :meth:`decode` sums the head over :data:`VIEWS`.

    Same parameters as the single-view head of the same variant row (``scg``, ``gnn1``,
    ``gnn2``, ``residual``); the arguments are those of :class:`SCGHead`.
    """

    def decode(self, projected: torch.Tensor) -> torch.Tensor | SegmentationOutput:
        """Σ over the views v of v(SCGHead.decode(v(projected))), logits B×c×h×w.

        In training a :class:`SegmentationOutput` with the views' L_kl and L_dl summed.
        """
        single = super().decode
        outputs = [(view, single(view(projected))) for view in VIEWS]
        if not self.training:
            return _sum(view(out) for view, out in outputs)
        return SegmentationOutput(
            _sum(view(out.logits) for view, out in outputs),
            kl_loss=_sum(out.kl_loss for _, out in outputs),
            dl_loss=_sum(out.dl_loss for _, out in outputs),
        )


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of tensors, without a zero to start from (none in an exported graph)."""
    return functools.reduce(operator.add, tensors)
