"""Run a geoseg checkpoint with PyTorch (CUDA with bf16 autocast when available)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch

from geoseg_cli.checkpoint import build_model, file_hash, load_checkpoint
from geoseg_cli.distributed import resolve_device
from geoseg_cli.inference.runtime import StreamPush
from geoseg_cli.inference.tta import View
from models import OUTPUT_STRIDE, Dihedral, FeatureStream, InferenceModel, mean_probabilities

log = logging.getLogger(__name__)


class TorchRuntime:
    """A checkpoint on PyTorch: a :class:`~geoseg_cli.inference.runtime.Runtime`.

    The trunk's BatchNorm is fused into its convolutions and the network runs channels-last
    (faster convolutions with oneDNN on a CPU and with cuDNN on CUDA).

    Args:
        path: A ``.pt`` checkpoint written by ``geoseg train``.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    output_stride = OUTPUT_STRIDE
    streams = True

    def __init__(self, path: str | os.PathLike, device: str = "auto") -> None:
        ckpt = load_checkpoint(path)
        self.info = ckpt.info
        self.model_hash = file_hash(path)
        self.device = resolve_device(device)
        self.on_gpu = self.device.type == "cuda"
        model = build_model(ckpt)
        model.backbone.fuse_batchnorm()
        self.module = (
            InferenceModel(model, ckpt.input.mean, ckpt.input.std)
            .to(self.device, memory_format=torch.channels_last)
            .eval()
        )
        self.feature_channels = model.head.projected_channels
        log.debug("PyTorch runtime on %s for %s", self.device, path)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of scaled windows."""
        return self._run(self.module, batch)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Features of scaled input."""
        return self._run(self.module.features, batch)

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        """Head logits of window features."""
        return self._run(self.module.head_logits, features)

    @torch.inference_mode()
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Upsampled, softmaxed and view-averaged logits, computed on the runtime's device."""
        return mean_probabilities(torch.from_numpy(logits).to(self.device)).cpu().numpy()

    def feature_stream(self, view: View, rows: int, cols: int) -> StreamPush:
        """Features of one view over a ``rows × cols`` area (multiples of the stride).

        Returns:
            ``push(pixels, last)``: the area's next scaled rows C×h×cols → the feature rows
            now complete (:class:`models.FeatureStream`).
        """
        stream = FeatureStream(self.module, Dihedral(view.k, view.flip), rows, cols)

        def push(pixels: np.ndarray, last: bool) -> np.ndarray:
            return self._run(lambda x: stream.push(x, last), pixels[np.newaxis])[0]

        return push

    @torch.inference_mode()
    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], array: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu):
            y = fn(x)
        return y.float().cpu().contiguous().numpy()
