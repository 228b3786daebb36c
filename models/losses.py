"""Segmentation losses: soft Dice (the paper's), cross-entropy, OHEM, plus the heads' terms.

The paper's objective (eq. 15) is L = L_dice + L_kl + L_dl; :class:`SegmentationLoss` adds
the model's auxiliary terms to whichever segmentation loss is chosen. CDGC's objective is
0.6·CE(coarse) + 0.7·OHEM-CE(refined) + 0.4·CE(aux); the head says so in its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from models.net import SegmentationOutput
from models.partial import unlabelled_terms

#: Segmentation loss kinds; ``dice`` is the paper's; ``partial`` is for sparse labels.
LOSS_KINDS = ("dice", "ce", "dice+ce", "partial")
#: Loss kinds that need dense labels.
DENSE_LOSSES = ("dice", "dice+ce")
#: OHEM keeps the pixels whose probability of their true class is at most this ...
OHEM_THRESHOLD = 0.7
#: ... and at least this share of the valid pixels, the hardest first.
OHEM_MIN_KEPT = 1 / 8


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss over classes on softmax probabilities.

    For each class k, Dice_k = (2·Σ p_k·y_k + s) / (Σ p_k + Σ y_k + s), sums over every valid
    pixel of the batch; the loss is 1 − mean_k Dice_k. Pixels labelled ``ignore_index`` are
    excluded from all sums.

    Args:
        logits: B×K×H×W class scores.
        target: B×H×W integer labels in [0, K) or ``ignore_index``.
        ignore_index: Label value of pixels that do not count.
        smooth: Additive smoothing s (keeps absent classes from dividing by zero).

    Returns:
        Scalar loss in [0, 1].
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = torch.softmax(logits.float(), dim=1) * valid
    onehot = F.one_hot(torch.where(valid.squeeze(1), target, 0).long(), num_classes)
    onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * intersection + smooth) / (total + smooth)).mean()


def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Pixel-wise cross-entropy, weighted mean over valid pixels (0 when none is valid).

    Args:
        logits: B×K×H×W class scores.
        target: B×H×W integer labels in [0, K) or ``ignore_index``.
        class_weights: Optional K weights (e.g. inverse class frequencies).
        ignore_index: Label value of pixels that do not count.

    Returns:
        Scalar loss.
    """
    target = target.long()
    per_pixel = F.cross_entropy(
        logits.float(), target, weight=class_weights, ignore_index=ignore_index, reduction="none"
    )
    valid = target != ignore_index
    if class_weights is None:
        denominator = valid.sum().to(per_pixel.dtype)
    else:
        denominator = (class_weights[torch.where(valid, target, 0)] * valid).sum()
    return per_pixel.sum() / denominator.clamp(min=torch.finfo(per_pixel.dtype).tiny)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    threshold: float = OHEM_THRESHOLD,
    min_kept: float = OHEM_MIN_KEPT,
) -> torch.Tensor:
    """Cross-entropy over the hard pixels only (online hard example mining).

    A valid pixel is kept when the softmax probability of its true class is at most
    ``threshold``; when that leaves fewer than ``min_kept`` of the valid pixels, the
    threshold rises to the probability of the ``⌈min_kept · valid⌉``-th hardest one. The
    loss is the mean cross-entropy of the kept pixels (0 when no pixel is valid).

    Args:
        logits: B×K×H×W class scores.
        target: B×H×W integer labels in [0, K) or ``ignore_index``.
        ignore_index: Label value of pixels that do not count.
        threshold: Probability of the true class up to which a pixel counts as hard.
        min_kept: Smallest share of the valid pixels kept, in (0, 1].

    Returns:
        Scalar loss.
    """
    target = target.long()
    per_pixel = F.cross_entropy(
        logits.float(), target, ignore_index=ignore_index, reduction="none"
    ).flatten()
    valid = (target != ignore_index).flatten()
    with torch.no_grad():
        probability = torch.where(valid, torch.exp(-per_pixel), 2.0)  # 2: never kept
        count = max(1, math.ceil(min_kept * int(valid.sum())))
        hardest = torch.kthvalue(probability, min(count, probability.numel())).values
        kept = probability <= torch.clamp(hardest, min=threshold)
    return (per_pixel * kept).sum() / kept.sum().clamp(min=1)


class LossOutput(NamedTuple):
    """Result of :class:`SegmentationLoss`.

    Attributes:
        total: The loss to back-propagate.
        parts: Detached terms for logging, each as it enters the total: ``dice`` and/or
            ``ce`` (or ``ohem``), ``entropy`` and ``smooth`` (``partial``), ``kl``, ``dl``,
            one per auxiliary logits (e.g. ``coarse``, ``aux``), and ``total``.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class SegmentationLoss(nn.Module):
    """Segmentation loss plus the model's auxiliary terms.

    For the SCG-Net variants with ``kind="dice"`` this is the paper's eq. 15. For a
    :class:`SegmentationOutput` the total is ``weight`` × the segmentation term of its
    logits (the chosen kind, or OHEM cross-entropy when the output asks for it) + L_kl +
    L_dl (when present) + each auxiliary logits' weight × its cross-entropy.

    Args:
        kind: ``dice`` (the paper's), ``ce`` (cross-entropy), ``dice+ce`` (their sum) or
            ``partial`` (sparse labels: cross-entropy on the labelled pixels plus the
            entropy and smoothness terms of :mod:`models.partial`, which need the image).
        class_weights: Optional per-class weights for the cross-entropy term.
        ignore_index: Label value of pixels that do not count.
    """

    def __init__(
        self,
        kind: str = "dice",
        class_weights: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss {kind!r}; valid losses: {', '.join(LOSS_KINDS)}")
        self.kind = kind
        self.ignore_index = ignore_index
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)

    def forward(
        self,
        output: SegmentationOutput | torch.Tensor,
        target: torch.Tensor,
        image: torch.Tensor | None = None,
    ) -> LossOutput:
        """Loss of a model output against labels.

        Args:
            output: A training-mode :class:`SegmentationOutput` (its terms are added) or
                plain logits (segmentation term only).
            target: B×H×W labels.
            image: B×C×H×W network input; the ``partial`` loss needs it, the others
                ignore it.

        Returns:
            The total and its detached parts.
        """
        if not isinstance(output, SegmentationOutput):
            output = SegmentationOutput(output)
        parts: dict[str, torch.Tensor] = {}
        logits, weight = output.logits, output.weight
        if output.ohem:
            parts["ohem"] = weight * ohem_cross_entropy(logits, target, self.ignore_index)
        else:
            if self.kind in ("dice", "dice+ce"):
                parts["dice"] = weight * dice_loss(logits, target, self.ignore_index)
            if self.kind in ("ce", "dice+ce", "partial"):
                parts["ce"] = weight * cross_entropy_loss(
                    logits, target, self.class_weights, self.ignore_index
                )
            if self.kind == "partial":
                if image is None:
                    raise ValueError("the partial loss needs the input image (colour affinities)")
                terms = unlabelled_terms(logits, target, image, self.ignore_index)
                parts.update({name: weight * term for name, term in terms.items()})
        for name, loss in (("kl", output.kl_loss), ("dl", output.dl_loss)):
            if loss is not None:
                parts[name] = loss
        for name, aux in output.auxiliary.items():
            parts[name] = aux.weight * cross_entropy_loss(
                aux.logits, target, self.class_weights, self.ignore_index
            )
        total = torch.stack(list(parts.values())).sum()
        parts = {key: value.detach() for key, value in parts.items()}
        parts["total"] = total.detach()
        return LossOutput(total, parts)
