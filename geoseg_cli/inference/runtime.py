"""The seam between predict and a model runtime (PyTorch or ONNX Runtime)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from geoseg_cli.checkpoint import ModelInfo
from geoseg_cli.errors import CheckpointError
from geoseg_cli.inference.tta import View

#: ``push(pixels, last)`` of a feature stream: the next scaled input rows C×h×W → the
#: feature rows F×h'×W/stride now complete (h' may be 0; all of them once ``last``).
StreamPush = Callable[[np.ndarray, bool], np.ndarray]


def check_shape(output: np.ndarray, expected: tuple[int, ...], what: str, fix: str) -> np.ndarray:
    """``output`` of a model call, refused unless it has the ``expected`` shape.

    Raises:
        CheckpointError: Names what the model returned and ``fix``.
    """
    if output.shape != expected:
        raise CheckpointError(
            f"the model returned {what} of shape {output.shape} (expected {expected}); {fix}"
        )
    return output


class Runtime(Protocol):
    """A model runtime: probabilities of windows, and optionally the network in two halves.

    Inputs are band values already scaled to [0, 1] (float32); standardization and softmax
    happen inside, exactly as inside an exported ONNX graph. "Features" are the backbone's
    features through the head's per-position linear maps: what the window-dependent rest of
    the head needs.

    Attributes:
        info: The model description (classes, input scaling, window).
        model_hash: Short SHA-256 of the model file.
        on_gpu: Whether the runtime computes on CUDA.
        output_stride: Input pixels per feature position; windows are multiples of it.
        feature_channels: Channels of :meth:`features`, or None when the runtime cannot run
            the network in two halves (:meth:`features`, :meth:`head_logits` and
            :meth:`probabilities` are then unavailable).
        streams: Whether :meth:`feature_stream` is available.
    """

    info: ModelInfo
    model_hash: str
    on_gpu: bool
    output_stride: int
    feature_channels: int | None
    streams: bool

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities N×K×H×W of scaled windows N×C×H×W."""
        ...

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Features N×F×H/s×W/s of scaled input N×C×H×W (H, W multiples of the stride s)."""
        ...

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits N×K×h×w of the rest of the head on window features N×F×h×w."""
        ...

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Mean over views of softmax(bilinear upsampling) of V×K×h×w logits: K×sh×sw."""
        ...

    def feature_stream(self, view: View, rows: int, cols: int) -> StreamPush:
        """Features of one view over a ``rows × cols`` area, fed top to bottom."""
        ...
