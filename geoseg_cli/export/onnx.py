"""``geoseg export onnx``: one self-describing model file for geoseg, GeoDeep and QGIS Deepness."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geoseg_cli.checkpoint import build_model, file_hash, load_checkpoint
from geoseg_cli.chips import load_stats
from geoseg_cli.errors import GeosegError, UsageError
from geoseg_cli.export.graphs import convert, default_opset, for_old_runtimes, trace
from geoseg_cli.export.metadata import (
    DEFAULT_OPSET,
    FP32_TOLERANCE,
    PRECISIONS,
    onnx_metadata,
    resolution_cm,
    split_paths,
    warn_about_clients,
)
from geoseg_cli.export.parity import float32_error, parity, split_parity
from geoseg_cli.inference.onnx_runtime import (
    GEOSEG_METADATA_KEY,
    GEOSEG_PART_KEY,
    import_onnx_dependency,
)
from geoseg_cli.raster import atomic_output, check_output
from models import OUTPUT_STRIDE, InferenceModel, InferencePart

log = logging.getLogger(__name__)

#: Batch size of the traced example and of the parity check (deliberately different).
EXPORT_BATCH = 2
PARITY_BATCH = 3


@dataclass
class ExportResult:
    """What an export produced and how closely it matches PyTorch.

    Attributes:
        path: The written ``.onnx`` file.
        precision: ``fp32``, ``fp16`` or ``int8``.
        opset: ONNX opset of the default domain.
        dynamic_size: Whether height and width are dynamic.
        window: Window size T of the input (the traced size when dynamic).
        parity_shapes: Input shapes of the parity run.
        max_abs_diff: Largest |ONNX Runtime − PyTorch| probability difference.
        class_agreement: Fraction of pixels whose argmax class agrees with PyTorch.
        size_bytes: File size.
        metadata: The ``metadata_props`` written (every value a JSON string).
        backbone: The backbone graph for the shared engine, if written.
        head: The head graph for the shared engine, if written.
        split_max_abs_diff: Largest |head(backbone(x)) in ONNX Runtime − PyTorch| probability
            difference, or None without the split graphs.
    """

    path: Path
    precision: str
    opset: int
    dynamic_size: bool
    window: int
    parity_shapes: list[list[int]]
    max_abs_diff: float
    class_agreement: float
    size_bytes: int
    metadata: dict[str, str]
    backbone: Path | None = None
    head: Path | None = None
    split_max_abs_diff: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for ``--json``)."""
        data = dataclasses.asdict(self)
        for key in ("path", "backbone", "head"):
            data[key] = None if data[key] is None else str(data[key])
        return data


def export_onnx(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_size: bool = False,
    precision: str = "fp32",
    stride: int | None = None,
    resolution: float | None = None,
    tolerance: float = FP32_TOLERANCE,
    overwrite: bool = False,
    split: bool = True,
    calibrate: str | os.PathLike | None = None,
) -> ExportResult:
    """Export a checkpoint to a self-contained ``.onnx`` file with metadata.

    The graph is :class:`models.InferenceModel` in eval mode: one float32 input ``image``
    [N, C, T, T] of band values scaled to [0, 1] (standardization inside) and one output
    ``probabilities`` [N, K, T, T] (softmax inside); the batch is dynamic, the window fixed
    unless ``dynamic_size`` (GeoDeep and Deepness read the tile size from the input shape).
    Beside it go the shared engine's graphs (:func:`split_paths`): the backbone with the
    head's projection on any tile, and the rest of the head on a window's features, named
    with their SHA-256 in the metadata so that a stale or foreign part is never used. Every
    graph is checked with ``onnx.checker`` and run with ONNX Runtime against PyTorch on
    random input at another batch size; fp32 must agree within ``tolerance`` or nothing is
    written.

    Args:
        checkpoint: A ``.pt`` written by ``geoseg train``.
        output: The ``.onnx`` file to write (atomically).
        opset: ONNX opset of the default domain (17 runs in QGIS's bundled onnxruntime).
        dynamic_size: Make height and width dynamic (GeoDeep and Deepness need fixed sizes).
        precision: ``fp32``, ``fp16`` (for GPUs) or ``int8`` (for CPUs; see
            ``calibrate``).
        stride: Recommended stride written to the metadata (default: predict's default,
            half the window); sets ``tiles_overlap``.
        resolution: Ground resolution in cm/px (default: from the checkpoint).
        tolerance: Largest accepted fp32 probability difference to PyTorch.
        overwrite: Replace an existing output.
        split: Also write the backbone and head graphs (``--engine shared`` needs them).
        calibrate: With ``int8``, a ``geoseg tile`` chips folder of the training data:
            static int8 (QDQ) calibrated on its train chips instead of dynamic
            quantization; the head graph stays fp32.

    Returns:
        The export summary, with parity against PyTorch.

    Raises:
        UsageError: Bad precision, opset or stride.
        CheckpointError: The checkpoint cannot be loaded.
        GeosegError: The exporter fails, or the fp32 graph does not match PyTorch.
    """
    onnx = import_onnx_dependency("onnx")
    import_onnx_dependency("onnxscript")
    import_onnx_dependency("onnxruntime")
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if opset < DEFAULT_OPSET:
        raise UsageError(f"--opset {opset} is too old; torch's exporter needs 17 or newer")
    if calibrate is not None:
        if precision != "int8":
            raise UsageError("--calibrate goes with --int8 (static int8 quantization)")
        calibrate = Path(calibrate)
        load_stats(calibrate)  # a chips folder, before the slow part
    parts = split_paths(output) if split else ()
    for path in (output, *parts):
        check_output(path, overwrite)
    ckpt = load_checkpoint(checkpoint)
    window, channels = ckpt.window, ckpt.model.in_channels
    stride = window // 2 if stride is None else stride
    if not 1 <= stride <= window:
        raise UsageError(f"--stride {stride} must be between 1 and the window ({window})")
    warn_about_clients(ckpt, dynamic_size)
    advertised = resolution_cm(ckpt, resolution)
    module = InferenceModel(build_model(ckpt), ckpt.input.mean, ckpt.input.std).eval()

    log.info(
        "exporting %s (%s, %d×%d windows, opset %d)", checkpoint, precision, window, window, opset
    )
    example = torch.rand(EXPORT_BATCH, channels, window, window)
    try:
        proto = trace(module, example, opset, dynamic_size)
        if split:
            with torch.no_grad():
                features = module.features(example)
            part_protos = (
                trace(
                    InferencePart(module, "features"), example, opset, True, ("image", "features")
                ),
                trace(
                    InferencePart(module, "head_logits"),
                    features,
                    opset,
                    dynamic_size,
                    ("features", "logits"),
                ),
            )
    except Exception as exc:  # the exporter raises many types; name the failing op
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GeosegError(
            f"{checkpoint}: ONNX export failed ({message}); rerun with -v for details"
        ) from exc
    actual_opset = default_opset(proto)
    if actual_opset != opset:
        raise GeosegError(
            f"{checkpoint}: the exporter produced opset {actual_opset}, not {opset}; "
            f"try --opset {actual_opset}"
        )
    details = {
        "output_stride": OUTPUT_STRIDE,
        "recommended_stride": stride,
        "resolution_cm": advertised,
        "precision": precision,
        "opset": opset,
        "dynamic_size": dynamic_size,
    }
    if precision == "int8":
        details["quantization"] = "dynamic" if calibrate is None else "static"
    metadata = onnx_metadata(ckpt, details)
    shapes = [(PARITY_BATCH, channels, window, window)]
    if dynamic_size:
        shapes.append((1, channels, window + 16, window + 32))
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(output, overwrite))
        part_tmps = [stack.enter_context(atomic_output(p, overwrite)) for p in parts]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if split:
            split_info = {"feature_channels": int(features.shape[1]), "head_output": "logits"}
            for name, part, part_tmp, final in zip(
                ("backbone", "head"), part_protos, part_tmps, parts, strict=True
            ):
                # the head's input is features, not chips: static int8 keeps it fp32
                kept = "fp32" if calibrate is not None and name == "head" else precision
                part = for_old_runtimes(convert(part, kept, workdir, calibrate, window))
                del part.metadata_props[:]
                onnx.helper.set_model_props(
                    part, {GEOSEG_PART_KEY: json.dumps({"part": name, "model": Path(output).name})}
                )
                onnx.checker.check_model(part)
                onnx.save_model(part, part_tmp, save_as_external_data=False)
                split_info[name] = {"file": final.name, "sha256": file_hash(part_tmp)}
            geoseg = json.loads(metadata[GEOSEG_METADATA_KEY])
            geoseg["split_graphs"] = split_info
            metadata[GEOSEG_METADATA_KEY] = json.dumps(geoseg)
        proto = for_old_runtimes(convert(proto, precision, workdir, calibrate, window))
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, metadata)
        onnx.checker.check_model(proto)
        onnx.save_model(proto, tmp, save_as_external_data=False)
        diff, agreement = parity(module, tmp, shapes)
        log.info(
            "parity with PyTorch on %s: max abs diff %.3g, class agreement %.4f%%",
            " + ".join("×".join(map(str, s)) for s in shapes),
            diff,
            100 * agreement,
        )
        if precision == "fp32" and not diff <= tolerance:
            noise = float32_error(module, shapes)
            raise GeosegError(
                f"{checkpoint}: the ONNX graph does not match PyTorch (max abs diff {diff:.3g} "
                f"> {tolerance:g}; PyTorch's own float32 error vs float64 is {noise:.3g}); "
                "nothing was written. If both are of the same order this is rounding: pass "
                "--tolerance; otherwise please report it"
            )
        split_diff = None
        if split:
            split_diff, feature_diff = split_parity(module, *part_tmps, shapes)
            log.info(
                "shared-engine graphs: head(backbone(x)) vs PyTorch max abs diff %.3g; "
                "backbone on a %d×%d tile: max relative feature diff %.3g",
                split_diff,
                window + 2 * OUTPUT_STRIDE,
                2 * window,
                feature_diff,
            )
            if precision == "fp32" and not max(split_diff, feature_diff) <= tolerance:
                raise GeosegError(
                    f"{checkpoint}: the backbone/head ONNX graphs do not match PyTorch (max "
                    f"abs diff {split_diff:.3g}, relative feature diff {feature_diff:.3g} > "
                    f"{tolerance:g}); nothing was written. Pass --tolerance if this is float32 "
                    "rounding, or --no-split to write model.onnx alone"
                )
        size = tmp.stat().st_size
    return ExportResult(
        path=Path(output),
        precision=precision,
        opset=opset,
        dynamic_size=dynamic_size,
        window=window,
        parity_shapes=[list(s) for s in shapes],
        max_abs_diff=diff,
        class_agreement=agreement,
        size_bytes=size,
        metadata=metadata,
        backbone=parts[0] if split else None,
        head=parts[1] if split else None,
        split_max_abs_diff=split_diff,
    )
