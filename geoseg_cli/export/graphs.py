"""Tracing networks to ONNX with torch's dynamo exporter, and converting the graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geoseg_cli.export.quiet import quiet_exporter
from geoseg_cli.inference.onnx_runtime import import_onnx_dependency


def trace(
    module: torch.nn.Module,
    example: torch.Tensor,
    opset: int,
    dynamic_size: bool,
    names: tuple[str, str] = ("image", "probabilities"),
) -> Any:
    """Export ``module`` with torch's dynamo exporter and return the ModelProto.

    ``names`` are the graph's input and output names.
    """
    dims = {0: torch.export.Dim("batch")}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    with quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[names[0]],
            output_names=[names[1]],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
        )
    return program.model_proto


def default_opset(proto: Any) -> int:
    """The opset of the default ONNX domain of a model."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def convert(
    proto: Any,
    precision: str,
    workdir: Path,
    calibrate: Path | None = None,
    window: int | None = None,
) -> Any:
    """Turn the fp32 graph into the requested precision (input/output stay float32).

    ``int8`` is static quantization calibrated on the chips folder ``calibrate`` (inputs
    of ``window`` px) when one is given, dynamic quantization otherwise.
    """
    onnx = import_onnx_dependency("onnx")
    if precision == "int8" and calibrate is not None:
        from geoseg_cli.export.quantize import quantize_static_int8

        return quantize_static_int8(proto, calibrate, window, workdir)
    if precision == "fp16":
        import onnx_ir
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # The converter appends the float32→float16 input casts at the end of the node
        # list; sort the graph so it is valid (topologically ordered) again.
        model = onnx_ir.from_proto(convert_float_to_float16(proto, keep_io_types=True))
        model.graph.sort()
        return onnx_ir.to_proto(model)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

        fp32, prepared, quantized = (workdir / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(proto, fp32)
        with quiet_exporter():
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            # uint8 weights: onnxruntime's ConvInteger runs u8×u8 faster than u8×s8 on x86
            # CPUs, and cannot saturate on CPUs without VNNI.
            quantize_dynamic(prepared, quantized, weight_type=QuantType.QUInt8)
        return onnx.load(str(quantized))
    return proto


def for_old_runtimes(proto: Any) -> Any:
    """Declare only the opsets the graph uses and the oldest IR version they allow.

    The exporter writes the newest IR version (10) even for opset 17; QGIS bundles older
    onnxruntime releases that refuse IR versions newer than they know, while opset 17 only
    needs IR 8.
    """
    import onnx

    used = {node.domain for node in proto.graph.node} | {""}
    kept = [o for o in proto.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    proto.ir_version = onnx.helper.find_min_ir_version_for(kept, ignore_unknown=True)
    return proto
