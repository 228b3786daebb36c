"""What an exported ONNX model says about itself: the geoseg contract, GeoDeep and Deepness keys."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from geoseg_cli.checkpoint import ModelInfo
from geoseg_cli.errors import UsageError
from geoseg_cli.inference.onnx_runtime import GEOSEG_METADATA_KEY

log = logging.getLogger(__name__)

#: Opset QGIS Deepness's bundled onnxruntime can run.
DEFAULT_OPSET = 17
#: Largest accepted |ONNX − PyTorch| probability difference for an fp32 export.
FP32_TOLERANCE = 1e-4
#: Precisions of an export: fp16 is for GPUs, int8 for CPUs.
PRECISIONS = ("fp32", "fp16", "int8")
#: Resolution (cm/px) written when neither the checkpoint nor the user knows it; it is
#: GeoDeep's own default for models without a ``resolution`` key.
DEFAULT_RESOLUTION_CM = 10.0


def split_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """Where the shared engine's graphs go.

    ``model.backbone.onnx`` and ``model.head.onnx`` beside ``model.onnx``.
    """
    output = Path(output)
    return output.with_name(f"{output.stem}.backbone.onnx"), output.with_name(
        f"{output.stem}.head.onnx"
    )


def resolution_cm(info: ModelInfo, resolution: float | None = None) -> float:
    """Ground resolution (cm/px) to advertise to Deepness/GeoDeep.

    Args:
        info: The model description; its ``input.resolution`` is in metres.
        resolution: Explicit value in cm/px (``--resolution``); wins over the checkpoint.
    """
    known = info.input.resolution * 100.0 if info.input.resolution else None
    if resolution is not None:
        if resolution <= 0:
            raise UsageError(f"--resolution {resolution} must be a positive number of cm/px")
        if known is not None and abs(known - resolution) > 1e-6 * known:
            log.warning(
                "--resolution %g cm/px differs from the training rasters' %g cm/px",
                resolution,
                known,
            )
        return float(resolution)
    if known is not None:
        return round(known, 6)
    log.warning(
        "the checkpoint does not record the training resolution; advertising %g cm/px to "
        "GeoDeep/Deepness (set it with --resolution CM_PER_PX)",
        DEFAULT_RESOLUTION_CM,
    )
    return DEFAULT_RESOLUTION_CM


def deepness_metadata(info: ModelInfo, stride: int, resolution: float) -> dict[str, Any]:
    """The keys QGIS Deepness and GeoDeep read, as Python values (JSON-encode each).

    Args:
        info: The model description.
        stride: Recommended stride in pixels; the overlap ``T - stride`` becomes the integer
            percentage ``tiles_overlap``.
        resolution: Ground resolution in cm/px.
    """
    window = info.window
    channels = info.model.in_channels
    return {
        "model_type": "Segmentor",
        "class_names": {str(i): c.name for i, c in enumerate(info.classes)},
        "resolution": resolution,
        "tiles_size": window,
        "tile_size": window,
        "tiles_overlap": round(100 * (window - stride) / window),
        "seg_thresh": 0.0,
        "seg_small_segment": 0,
        # Standardization is inside the graph: clients must feed plain [0, 1] values.
        "standardization_mean": [0.0] * channels,
        "standardization_std": [1.0] * channels,
    }


def onnx_metadata(info: ModelInfo, details: dict[str, Any]) -> dict[str, str]:
    """All ``metadata_props`` of an exported model: key → JSON-encoded value.

    ``geoseg`` holds :meth:`ModelInfo.describe` plus the export ``details``
    (``output_stride``, ``recommended_stride``, ``resolution_cm``, ``precision``, ``opset``,
    ``dynamic_size``); the other keys are :func:`deepness_metadata`.
    """
    geoseg = {**info.describe(), **details}
    deepness = deepness_metadata(info, details["recommended_stride"], details["resolution_cm"])
    values = {GEOSEG_METADATA_KEY: geoseg, **deepness}
    return {key: json.dumps(value) for key, value in values.items()}


def warn_about_clients(info: ModelInfo, dynamic_size: bool) -> None:
    """Say when GeoDeep/Deepness will not feed the model what it was trained on."""
    if info.model.in_channels != 3:
        log.warning(
            "this model takes %d band(s); GeoDeep and QGIS Deepness feed 3-band RGB tiles",
            info.model.in_channels,
        )
    if info.input.dtype != "uint8" or abs(info.input.scale * 255 - 1) > 1e-6:
        log.warning(
            "this model scales %s input by %g; GeoDeep and Deepness divide uint8 by 255, "
            "so results there will differ from geoseg predict",
            info.input.dtype,
            info.input.scale,
        )
    if dynamic_size:
        log.warning(
            "--dynamic-size: GeoDeep and QGIS Deepness need a fixed window; "
            "export without it for them"
        )
