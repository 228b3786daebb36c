"""Inference: sliding-window prediction of rasters of any size with PyTorch or ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

from geoseg_cli.inference.plan import PredictOptions
from geoseg_cli.inference.predict import PredictResult, predict_raster, predict_rasters
from geoseg_cli.inference.runtime import Runtime

__all__ = [
    "PredictOptions",
    "PredictResult",
    "Runtime",
    "load_runtime",
    "predict_raster",
    "predict_rasters",
]


def load_runtime(path: str | os.PathLike, device: str = "auto") -> Runtime:
    """Open a model file: ``.onnx`` runs on ONNX Runtime, anything else is a checkpoint.

    Only the runtime a file needs is imported: an ONNX model never imports PyTorch.
    """
    if Path(path).suffix.lower() == ".onnx":
        from geoseg_cli.inference.onnx_runtime import OnnxRuntime

        return OnnxRuntime(path, device)
    from geoseg_cli.inference.torch_runtime import TorchRuntime

    return TorchRuntime(path, device)
