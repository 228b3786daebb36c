"""Inference engines: one seam between predict and the runtime (PyTorch or ONNX Runtime).

An engine maps a batch of windows whose band values are already scaled to [0, 1]
(N×C×T×T float32) to per-class probabilities (N×K×T×T float32). Standardization and
softmax happen inside the engine, exactly as inside an exported ONNX graph.

Engines that can also run the two halves of the network separately — the backbone and the
head's per-position projection on any region (standardization included), and the rest of
the head on window patches of it, up to the logits at feature resolution — implement
:class:`FeatureEngine`; predict's shared-backbone mode (:mod:`geoseg_cli.shared`) needs it
and turns the logits into probabilities with :func:`mean_probabilities`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from geoseg_cli.checkpoint import ModelInfo, build_model, file_hash, load_checkpoint
from geoseg_cli.rowstream import FeatureStream
from geoseg_cli.tta import View

log = logging.getLogger(__name__)

#: Output stride of the backbone: features have one position per 16×16 input pixels.
FEATURE_STRIDE = 16
#: Feature rows :func:`mean_probabilities` upsamples at once: with 448-px windows and three
#: views a chunk of 64 output rows stays in a CPU core's cache through the upsampling,
#: softmax and mean (2.3–2.5 ms per window on a 2-core CPU, against 5.0 ms for
#: ``F.interpolate`` and softmax on whole windows).
CHUNK_CELLS = 4
#: Weight of the later of the two input rows that output row 16·c + o (o < 16) lies between
#: (rows c − 1 and c for o < 8, c and c + 1 from 8 on) in bilinear upsampling by 16 with
#: align_corners=False: the fraction of (o + 0.5)/16 − 0.5.
_LATER_ROW_WEIGHT = ((torch.arange(FEATURE_STRIDE) + 0.5) / FEATURE_STRIDE + 0.5) % 1


#: ``push(pixels, last)`` of a feature stream (:meth:`TorchEngine.feature_stream`).
StreamPush = Callable[[np.ndarray, bool], np.ndarray]


class Engine(Protocol):
    """What predict needs from a runtime."""

    info: ModelInfo
    model_hash: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N×K×H×W float32) for scaled input windows (N×C×H×W float32)."""
        ...


class FeatureEngine(Engine, Protocol):
    """An engine that also runs the backbone and the head separately.

    "Features" are the backbone's features through the head's per-position linear maps
    (:meth:`models.SCGHead.project`): what the window-dependent rest of the head needs.

    Attributes:
        feature_channels: Channels F of the features (128 + 10·K for the ``scg`` kinds,
            128 + 9·K for ``scgae``, K classes), or None when this engine cannot split the
            network (e.g. an ONNX model exported without its backbone and head graphs).
    """

    feature_channels: int | None

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Features (N×F×H/16×W/16 float32) of scaled input (N×C×H×W float32, H and W
        multiples of 16); standardization is applied first."""
        ...

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits (N×K×h×w float32) of the rest of the head on window features (N×F×h×w
        float32), at feature resolution: :func:`mean_probabilities` of them is what
        :meth:`predict` returns for the window."""
        ...


class InferenceModel(nn.Module):
    """Standardize scaled input, run the network, return softmax probabilities.

    This is the graph that ``geoseg export onnx`` exports and that :class:`TorchEngine` runs.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((image - self.mean) / self.std), dim=1)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The first half of :meth:`forward`: standardize, the backbone (stride 16), the
        head's per-position projection (:meth:`models.SCGHead.project`)."""
        return self.model.head.project(self.model.backbone((image - self.mean) / self.std))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The second half of :meth:`forward` up to the upsampling: the rest of the head
        on a window's features, logits at feature resolution.

        :func:`mean_probabilities` of ``head_logits(features(x))`` equals ``forward(x)``
        for windows whose sides are multiples of 16.
        """
        return self.model.head.decode(features)


@functools.lru_cache(maxsize=8)
def _upsampling_matrix(size: int, device: torch.device) -> torch.Tensor:
    """The (16·size)×size matrix of bilinear upsampling by :data:`FEATURE_STRIDE` along
    one axis (align_corners=False, edges clamped), as ``F.interpolate`` does it."""
    eye = torch.eye(size)[None, None]
    upsampled = F.interpolate(
        eye, (size * FEATURE_STRIDE, size), mode="bilinear", align_corners=False
    )
    return upsampled[0, 0].to(device)


def _upsample_rows(padded: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Output rows 16·first to 16·(first + count) of bilinear upsampling by 16 along the
    rows of ``padded`` (…×(h + 2)×W: the input with its first and last rows repeated, which
    is the edge clamping), each a weighted sum of two input rows."""
    s, half = FEATURE_STRIDE, FEATURE_STRIDE // 2
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
    align_corners=False, then softmax over classes); with the views of a window, each
    mapped back to the original orientation, it is the TTA mean. Upsampling by 16 commutes
    with the dihedral views, so mapping the small logits back first changes nothing. The
    columns are upsampled by a product with :func:`_upsampling_matrix`, the rows
    :data:`CHUNK_CELLS` feature rows at a time as two-row weighted sums, and each chunk goes
    through softmax and the mean while it is in cache. The weights are the bilinear ones
    (multiples of 1/32), so the result is ``F.interpolate``'s up to float rounding.

    Args:
        logits: V×K×h×w float32 logits of V views, in the original orientation, on any
            device.

    Returns:
        K×16h×16w float32 probabilities on the logits' device.
    """
    _, classes, height, width = logits.shape
    s = FEATURE_STRIDE
    wide = torch.matmul(logits, _upsampling_matrix(width, logits.device).T)  # V×K×h×16w
    padded = torch.cat([wide[:, :, :1], wide, wide[:, :, -1:]], dim=2)
    out = logits.new_empty(classes, height * s, width * s)
    for first in range(0, height, CHUNK_CELLS):
        count = min(CHUNK_CELLS, height - first)
        rows = _upsample_rows(padded, first, count)  # V×K×16·count×16w
        target = out[:, first * s : (first + count) * s]
        if len(rows) == 1:  # no view mean: the softmax straight into the output
            torch.softmax(rows[0], dim=0, out=target)
        else:
            torch.mean(torch.softmax(rows, dim=1), dim=0, out=target)
    return out


class BackboneGraph(nn.Module):
    """:meth:`InferenceModel.features` as a module (the exported backbone graph)."""

    def __init__(self, inference: InferenceModel) -> None:
        super().__init__()
        self.inference = inference

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.inference.features(image)


class HeadGraph(nn.Module):
    """:meth:`InferenceModel.head_logits` as a module (the exported head graph)."""

    def __init__(self, inference: InferenceModel) -> None:
        super().__init__()
        self.inference = inference

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.inference.head_logits(features)


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda`` into a torch device (auto picks CUDA when present)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from geoseg_cli.errors import UsageError

        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


class TorchEngine:
    """Runs a geoseg checkpoint with PyTorch (CUDA with bf16 autocast when available)."""

    def __init__(self, path: str | os.PathLike, device: str = "auto") -> None:
        ckpt = load_checkpoint(path)
        self.info = ckpt.info
        self.model_hash = file_hash(path)
        self.device = resolve_device(device)
        model = build_model(ckpt)
        model.backbone.fuse_batchnorm()
        # channels_last: faster convolutions on CUDA and on CPU (oneDNN): 1.3x for the
        # resnet50 trunk and 12x for the head's 1x1 convolution on a 2-core AVX-512 CPU.
        self.module = (
            InferenceModel(model, ckpt.input.mean, ckpt.input.std)
            .to(self.device, memory_format=torch.channels_last)
            .eval()
        )
        log.debug("PyTorch engine on %s for %s", self.device, path)

    @property
    def feature_channels(self) -> int:
        """Channels of the features (the head's projection)."""
        return self.module.model.head.projected_channels

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._run(self.module, batch)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Features of scaled input (see :class:`FeatureEngine`)."""
        return self._run(self.module.features, batch)

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        """Head logits on window features (see :class:`FeatureEngine`)."""
        return self._run(self.module.head_logits, features)

    def feature_stream(self, view: View, rows: int, cols: int) -> StreamPush:
        """Features of one TTA view over a ``rows × cols`` area (multiples of 16), fed
        top to bottom (:class:`~geoseg_cli.rowstream.FeatureStream`).

        Returns:
            ``push(pixels, last)``: scaled input C × h × cols (the area's next rows) →
            F × h' × cols/16 feature rows now complete (h' may be 0; all once ``last``).
        """
        stream = FeatureStream(self.module, view, rows, cols)

        def push(pixels: np.ndarray, last: bool) -> np.ndarray:
            return self._run(lambda x: stream.push(x, last), pixels[np.newaxis])[0]

        return push

    @torch.inference_mode()
    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], array: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        ):
            y = fn(x)
        return y.float().cpu().contiguous().numpy()


def load_engine(path: str | os.PathLike, device: str = "auto") -> Engine:
    """Open a model file: ``.onnx`` runs on ONNX Runtime, anything else is a checkpoint."""
    if Path(path).suffix.lower() == ".onnx":
        from geoseg_cli.onnx_engine import OnnxEngine

        return OnnxEngine(path, device)
    return TorchEngine(path, device)
