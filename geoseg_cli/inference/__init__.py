"""Inference: sliding-window prediction of rasters of any size with PyTorch or ONNX Runtime."""

from geoseg_cli.inference.plan import PredictOptions
from geoseg_cli.inference.predict import PredictResult, predict_raster, predict_rasters
from geoseg_cli.inference.runtime import Runtime, load_runtime

__all__ = [
    "PredictOptions",
    "PredictResult",
    "Runtime",
    "load_runtime",
    "predict_raster",
    "predict_rasters",
]
