"""Static int8 (QDQ) quantization of exported graphs, calibrated on training chips."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from geoseg_cli.chips import load_stats, read_manifest
from geoseg_cli.errors import InputError
from geoseg_cli.export.quiet import quiet_exporter
from geoseg_cli.inference.onnx_runtime import import_onnx_dependency

log = logging.getLogger(__name__)

#: Chips the calibration reads at most (spread evenly over the train split).
CALIBRATION_CHIPS = 64
#: Chips per calibration batch.
CALIBRATION_BATCH = 8
#: Operators quantized: the convolutional trunk runs in int8 from one convolution to the
#: next (residual adds, ReLUs and the max-pool included).
QUANTIZED_OPS = ("Conv", "Add", "MaxPool", "Relu")


class ChipsCalibration:
    """Training chips of a ``geoseg tile`` folder, scaled as the graph's input, in batches.

    An ``onnxruntime.quantization.CalibrationDataReader``. Only ``train`` chips are used,
    so the validation chips stay held out.

    Args:
        chips_dir: The chips folder.
        input_name: The graph's input name.
        window: Side every chip is centre-cropped or reflect-padded to.
        limit: Chips read at most.

    Raises:
        InputError: The folder is not a chips folder or has no train chips.
    """

    def __init__(
        self,
        chips_dir: str | os.PathLike,
        input_name: str,
        window: int,
        limit: int = CALIBRATION_CHIPS,
    ) -> None:
        self.scale = np.float32(load_stats(chips_dir).input.scale)
        train = [r for r in read_manifest(chips_dir) if r.split == "train"]
        if not train:
            raise InputError(f"{chips_dir}: no train chips to calibrate on; re-run geoseg tile")
        step = max(1, len(train) // limit)
        self.paths = [r.image(chips_dir) for r in train[::step][:limit]]
        self.input_name, self.window = input_name, window
        self._position = 0

    def _chip(self, path: Path) -> np.ndarray:
        with rasterio.open(path) as src:
            data = src.read().astype(np.float32) * self.scale
        t = self.window
        for axis in (1, 2):
            size = data.shape[axis]
            if size > t:
                data = np.take(data, np.arange((size - t) // 2, (size - t) // 2 + t), axis=axis)
            elif size < t:
                pad = [(0, 0)] * 3
                pad[axis] = (0, t - size)
                data = np.pad(data, pad, mode="reflect")
        return data

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch of chips, or None once every chip was fed."""
        if self._position >= len(self.paths):
            return None
        paths = self.paths[self._position : self._position + CALIBRATION_BATCH]
        self._position += len(paths)
        return {self.input_name: np.stack([self._chip(p) for p in paths])}

    def rewind(self) -> None:
        """Start again from the first chip."""
        self._position = 0


def head_nodes(proto: Any) -> list[str]:
    """Names of the nodes after the backbone's trunk, kept in float.

    In topological order, everything after the trunk's last residual Add (and its ReLU)
    ahead of the first MatMul: the SCG head's projections and graph convolutions, their
    normalisation, the upsampling and the softmax.
    """
    nodes = list(proto.graph.node)
    first_matmul = next((i for i, n in enumerate(nodes) if n.op_type == "MatMul"), len(nodes))
    adds = [i for i, n in enumerate(nodes[:first_matmul]) if n.op_type == "Add"]
    if not adds:
        return []
    start = adds[-1] + 1
    if start < len(nodes) and nodes[start].op_type == "Relu":
        start += 1
    return [n.name for n in nodes[start:]]


def quantize_static_int8(proto: Any, chips_dir: Path, window: int, workdir: Path) -> Any:
    """A static QDQ int8 copy of an fp32 graph, calibrated on ``chips_dir``.

    ONNX Runtime's pre-processing (shape inference, BatchNorm folded into the
    convolutions) first; then :data:`QUANTIZED_OPS` of the trunk get QuantizeLinear /
    DequantizeLinear pairs: uint8 activations with ranges from the chips (min/max), int8
    weights per output channel (symmetric; the u8×s8 kernels of x86 VNNI/AMX CPUs). The
    head (:func:`head_nodes`) stays float. Input and output stay float32.

    Args:
        proto: The fp32 ModelProto (one float32 image input).
        chips_dir: A ``geoseg tile`` folder of the model's training data.
        window: Side of the calibration inputs.
        workdir: A scratch folder.
    """
    onnx = import_onnx_dependency("onnx")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    fp32, prepared, quantized = (workdir / n for n in ("fp32.onnx", "pre.onnx", "qdq.onnx"))
    onnx.save_model(proto, fp32)
    reader = ChipsCalibration(chips_dir, proto.graph.input[0].name, window)
    with quiet_exporter():
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        excluded = head_nodes(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True},
        )
    log.info(
        "static int8: calibrated on %d train chips of %s; %d head nodes kept in float",
        len(reader.paths),
        chips_dir,
        len(excluded),
    )
    return onnx.load(str(quantized))
