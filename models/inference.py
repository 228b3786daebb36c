"""Inference graphs of a trained network: standardization, softmax, backbone/head split."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from models.backbone import OUTPUT_STRIDE

#: Feature rows :func:`mean_probabilities` upsamples at once, so that a chunk stays in a CPU
#: core's cache through the upsampling, softmax and view mean.
CHUNK_CELLS = 4
#: Weight of the later of the two input rows that output row 16·c + o (o < 16) lies between
#: (rows c − 1 and c for o < 8, c and c + 1 from 8 on) in bilinear upsampling by 16 with
#: align_corners=False: the fraction of (o + 0.5)/16 − 0.5.
_LATER_ROW_WEIGHT = ((torch.arange(OUTPUT_STRIDE) + 0.5) / OUTPUT_STRIDE + 0.5) % 1


class InferenceModel(nn.Module):
    """Standardize band values scaled to [0, 1], run the network, return softmax probabilities.

    This is the graph ``geoseg export onnx`` exports and the PyTorch runtime runs. It also
    runs in two halves, :meth:`features` (window-independent) and :meth:`head_logits` (per
    window), for inference that shares the backbone between overlapping windows.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities N×K×H×W of scaled input N×C×H×W."""
        return torch.softmax(self.model((image - self.mean) / self.std), dim=1)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Standardize, backbone, the head's per-position projection (H, W multiples of 16)."""
        return self.model.head.project(self.model.backbone((image - self.mean) / self.std))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The rest of the head on one window's features: logits at feature resolution.

        :func:`mean_probabilities` of ``head_logits(features(x))`` equals ``forward(x)``.
        """
        return self.model.head.decode(features)


class InferencePart(nn.Module):
    """One method of an :class:`InferenceModel` as a module of its own (an exportable graph).

    Args:
        inference: The model.
        method: ``"features"`` or ``"head_logits"``.
    """

    def __init__(self, inference: InferenceModel, method: str) -> None:
        super().__init__()
        self.inference = inference
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The method's output for ``x``."""
        return getattr(self.inference, self.method)(x)


@functools.lru_cache(maxsize=8)
def upsampling_matrix(size: int, device: torch.device) -> torch.Tensor:
    """The (16·size)×size matrix of bilinear upsampling by the output stride along one axis.

    align_corners=False with edges clamped, as ``F.interpolate`` does it.
    """
    eye = torch.eye(size)[None, None]
    upsampled = F.interpolate(
        eye, (size * OUTPUT_STRIDE, size), mode="bilinear", align_corners=False
    )
    return upsampled[0, 0].to(device)


def _upsample_rows(padded: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Output rows 16·first to 16·(first + count) of upsampling the rows of ``padded`` by 16.

    ``padded`` is …×(h + 2)×W, the input with its first and last rows repeated (the edge
    clamping); each output row is a weighted sum of two input rows.
    """
    s, half = OUTPUT_STRIDE, OUTPUT_STRIDE // 2
    out = padded.new_empty(*padded.shape[:-2], count, s, padded.shape[-1])
    later = _LATER_ROW_WEIGHT.to(padded.device)
    for offsets, start in ((slice(None, half), first), (slice(half, None), first + 1)):
        weight = later[offsets, None]
        part = out[..., offsets, :]
        torch.mul(padded[..., start : start + count, None, :], 1 - weight, out=part)
        part.addcmul_(padded[..., start + 1 : start + 1 + count, None, :], weight)
    return out.flatten(-3, -2)


def mean_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Mean over views of softmax(bilinear upsampling by 16 of the logits).

    For one view this is how :class:`InferenceModel` ends (``F.interpolate`` with
    align_corners=False, then softmax over classes); with the views of a window mapped back
    to the original orientation it is the TTA mean (upsampling commutes with the dihedral
    views). Columns are upsampled by a product with :func:`upsampling_matrix`, rows
    :data:`CHUNK_CELLS` feature rows at a time, each chunk going through softmax and the
    mean while it is in cache.

    Args:
        logits: V×K×h×w logits of V views in the original orientation, on any device.

    Returns:
        K×16h×16w probabilities on the logits' device.
    """
    _, classes, height, width = logits.shape
    s = OUTPUT_STRIDE
    wide = torch.matmul(logits, upsampling_matrix(width, logits.device).T)  # V×K×h×16w
    padded = torch.cat([wide[:, :, :1], wide, wide[:, :, -1:]], dim=2)
    out = logits.new_empty(classes, height * s, width * s)
    for first in range(0, height, CHUNK_CELLS):
        count = min(CHUNK_CELLS, height - first)
        rows = _upsample_rows(padded, first, count)  # V×K×16·count×16w
        target = out[:, first * s : (first + count) * s]
        if len(rows) == 1:  # one view: the softmax straight into the output
            torch.softmax(rows[0], dim=0, out=target)
        else:
            torch.mean(torch.softmax(rows, dim=1), dim=0, out=target)
    return out
