"""Inference engines: one seam between predict and the runtime (PyTorch or ONNX Runtime).

An engine maps a batch of windows whose band values are already scaled to [0, 1]
(N×C×T×T float32) to per-class probabilities (N×K×T×T float32). Standardization and
softmax happen inside the engine, exactly as inside an exported ONNX graph.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from geoseg_cli.checkpoint import ModelInfo, build_model, file_hash, load_checkpoint

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What predict needs from a runtime."""

    info: ModelInfo
    model_hash: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N×K×H×W float32) for scaled input windows (N×C×H×W float32)."""
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
        self.module = InferenceModel(model, ckpt.input.mean, ckpt.input.std).to(self.device).eval()
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
        log.debug("PyTorch engine on %s for %s", self.device, path)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        ):
            probs = self.module(x)
        return probs.float().cpu().numpy()


def load_engine(path: str | os.PathLike, device: str = "auto") -> Engine:
    """Open a model file: ``.onnx`` runs on ONNX Runtime, anything else is a checkpoint."""
    if Path(path).suffix.lower() == ".onnx":
        from geoseg_cli.onnx_engine import OnnxEngine

        return OnnxEngine(path, device)
    return TorchEngine(path, device)
