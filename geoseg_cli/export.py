"""ONNX export: one self-describing model file for geoseg, GeoDeep and QGIS Deepness (§7).

The exported graph is :class:`~geoseg_cli.engine.InferenceModel` in eval mode: one float32
input ``image`` [N, C, T, T] with band values already scaled to [0, 1] (standardization is
inside the graph) and one output ``probabilities`` [N, K, T, T] (softmax inside the graph).
The batch is dynamic; the window is fixed unless ``dynamic_size`` is asked for, because
Deepness and GeoDeep read the tile size from the input shape.

After export the file is checked with ``onnx.checker`` and run with ONNX Runtime on random
input (band values around the training data's means) at a batch size other than the traced
one; fp32 must match PyTorch within :data:`FP32_TOLERANCE` (or the given tolerance) or
nothing is written.

Beside ``model.onnx`` two more graphs are written for predict's shared-backbone engine
(unless ``split=False``): ``model.backbone.onnx`` (``image`` [N, C, H, W], any H and W
multiples of 16 → ``features`` [N, F, H/16, W/16]: standardization, the backbone and the
head's per-position projection) and ``model.head.onnx`` (``features`` [N, F, T/16, T/16]
→ ``logits`` [N, K, T/16, T/16]: the rest of the head; predict upsamples, applies softmax
and averages the TTA views itself, with :func:`~geoseg_cli.engine.mean_probabilities`).
The ``geoseg`` metadata of ``model.onnx`` names them with their SHA-256, so a stale or
foreign part is never used; ``model.onnx`` itself stays the plain single graph GeoDeep and
QGIS Deepness run. Both parts are parity-checked too: the head on the backbone's features
against PyTorch's whole network, and the backbone alone on a tile larger than the window.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg_cli.checkpoint import ModelInfo, build_model, file_hash, load_checkpoint
from geoseg_cli.engine import (
    FEATURE_STRIDE,
    BackboneGraph,
    HeadGraph,
    InferenceModel,
    mean_probabilities,
)
from geoseg_cli.errors import GeosegError, UsageError
from geoseg_cli.onnx_engine import (
    GEOSEG_METADATA_KEY,
    create_session,
    import_onnx_dependency,
)
from geoseg_cli.raster import atomic_output, check_output

log = logging.getLogger(__name__)

#: Opset QGIS Deepness's bundled onnxruntime can run.
DEFAULT_OPSET = 17
#: Largest accepted |ONNX − PyTorch| probability difference for an fp32 export.
FP32_TOLERANCE = 1e-4
#: Resolution (cm/px) written when neither the checkpoint nor the user knows it; it is
#: GeoDeep's own default for models without a ``resolution`` key.
DEFAULT_RESOLUTION_CM = 10.0
#: Batch size of the traced example and of the parity check (deliberately different).
EXPORT_BATCH = 2
PARITY_BATCH = 3
PRECISIONS = ("fp32", "fp16", "int8")
#: Loggers of the exporter stack whose progress chatter is hidden unless geoseg runs with -v.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


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


def split_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """Where the shared engine's graphs go: ``model.backbone.onnx`` and ``model.head.onnx``
    beside ``model.onnx``."""
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


def onnx_metadata(
    info: ModelInfo,
    *,
    stride: int,
    resolution: float,
    precision: str,
    opset: int,
    dynamic_size: bool,
) -> dict[str, str]:
    """All ``metadata_props`` of an exported model: key → JSON-encoded value.

    ``geoseg`` holds :meth:`ModelInfo.describe` plus the export details (recommended
    stride, resolution, precision, opset, dynamic size); the other keys are
    :func:`deepness_metadata`.
    """
    geoseg = info.describe()
    geoseg.update(
        recommended_stride=stride,
        resolution_cm=resolution,
        precision=precision,
        opset=opset,
        dynamic_size=dynamic_size,
    )
    values = {GEOSEG_METADATA_KEY: geoseg, **deepness_metadata(info, stride, resolution)}
    return {key: json.dumps(value) for key, value in values.items()}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's progress prints, warnings and log chatter (shown with -v).

    Also keeps libraries that log through the root logger (onnxruntime.quantization) from
    installing a root handler of their own.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    root = logging.getLogger()
    root_level, guard = root.level, logging.NullHandler()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    root.addHandler(guard)
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        root.removeHandler(guard)
        root.setLevel(root_level)


def _trace(
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
    with _quiet_exporter():
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


def _default_opset(proto: Any) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _convert(proto: Any, precision: str, workdir: Path) -> Any:
    """Turn the fp32 graph into the requested precision (input/output stay float32)."""
    onnx = import_onnx_dependency("onnx")
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
        with _quiet_exporter():
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            # uint8 weights: onnxruntime's ConvInteger runs u8×u8 several times faster
            # than u8×s8 on x86 CPUs, and cannot saturate on CPUs without VNNI.
            quantize_dynamic(prepared, quantized, weight_type=QuantType.QUInt8)
        return onnx.load(str(quantized))
    return proto


def _for_old_runtimes(proto: Any) -> Any:
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


def _parity_inputs(module: InferenceModel, shapes: list[tuple[int, ...]]) -> Iterator[torch.Tensor]:
    """The seeded random inputs of the parity check (the same on every call): band values
    drawn around the training data's band means with its standard deviations, clipped to
    [0, 1], as the model sees them in use. (Uniform [0, 1) values are tens of standard
    deviations off for imagery such as 11-bit pan scaled by 1/10000, where activations,
    and float32 rounding with them, grow far beyond anything real input produces.)"""
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        noise = torch.randn(shape, generator=generator)
        yield (module.mean + module.std * noise).clamp(0, 1)


def _parity(
    module: InferenceModel, path: Path, shapes: list[tuple[int, ...]]
) -> tuple[float, float]:
    """Max abs probability difference and argmax agreement, ONNX Runtime vs PyTorch."""
    session = create_session(path, ["CPUExecutionProvider"])
    diff, agree, total = 0.0, 0, 0
    for x in _parity_inputs(module, shapes):
        with torch.inference_mode():
            expected = module(x).numpy()
        (actual,) = session.run(None, {"image": x.numpy()})
        diff = max(diff, float(np.abs(actual.astype(np.float32) - expected).max()))
        agree += int((actual.argmax(1) == expected.argmax(1)).sum())
        total += expected.shape[0] * expected.shape[2] * expected.shape[3]
    return diff, agree / total


def _split_parity(
    module: InferenceModel, backbone: Path, head: Path, shapes: list[tuple[int, ...]]
) -> tuple[float, float]:
    """ONNX Runtime head(backbone(x)), through :func:`mean_probabilities`, vs PyTorch's
    whole network (max abs probability difference), and the backbone alone on a tile wider
    and taller than the window vs PyTorch's features (max abs difference relative to the
    largest feature)."""
    providers = ["CPUExecutionProvider"]
    backbone_session = create_session(backbone, providers)
    head_session = create_session(head, providers)
    diff = 0.0
    for x in _parity_inputs(module, shapes):
        with torch.inference_mode():
            expected = module(x).numpy()
        (features,) = backbone_session.run(None, {"image": x.numpy()})
        (logits,) = head_session.run(None, {"features": features})
        logits = torch.from_numpy(logits.astype(np.float32))
        actual = np.stack([mean_probabilities(item[None]).numpy() for item in logits])
        diff = max(diff, float(np.abs(actual - expected).max()))
    channels, window = shapes[0][1], shapes[0][-1]
    (tile,) = _parity_inputs(module, [(1, channels, window + 2 * FEATURE_STRIDE, 2 * window)])
    with torch.inference_mode():
        expected = module.features(tile).numpy()
    (actual,) = backbone_session.run(None, {"image": tile.numpy()})
    relative = float(np.abs(actual.astype(np.float32) - expected).max() / np.abs(expected).max())
    return diff, relative


def _float32_error(module: InferenceModel, shapes: list[tuple[int, ...]]) -> float:
    """Max abs difference between PyTorch in float32 and in float64 on the parity inputs:
    the rounding noise any float32 runtime has on this model."""
    reference = copy.deepcopy(module).double()
    error = 0.0
    with torch.inference_mode():
        for x in _parity_inputs(module, shapes):
            exact = reference(x.double())
            error = max(error, float((module(x).double() - exact).abs().max()))
    return error


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
) -> ExportResult:
    """Export a checkpoint to a self-contained ``.onnx`` file with metadata, plus the
    backbone and head graphs of predict's shared engine beside it (see :func:`split_paths`).

    Args:
        checkpoint: A ``.pt`` written by ``geoseg train``.
        output: The ``.onnx`` file to write (atomically).
        opset: ONNX opset of the default domain (17 runs in QGIS's bundled onnxruntime).
        dynamic_size: Make height and width dynamic (GeoDeep and Deepness need fixed sizes).
        precision: ``fp32``, ``fp16`` (for GPUs) or ``int8`` (dynamic quantization for CPUs).
        stride: Recommended stride written to the metadata (default: predict's default,
            half the window); sets ``tiles_overlap``.
        resolution: Ground resolution in cm/px (default: from the checkpoint).
        tolerance: Largest accepted fp32 probability difference to PyTorch.
        overwrite: Replace an existing output.
        split: Also write the backbone and head graphs (``--engine shared`` needs them).

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
    parts = split_paths(output) if split else ()
    for path in (output, *parts):
        check_output(path, overwrite)
    ckpt = load_checkpoint(checkpoint)
    window, channels = ckpt.window, ckpt.model.in_channels
    stride = window // 2 if stride is None else stride
    if not 1 <= stride <= window:
        raise UsageError(f"--stride {stride} must be between 1 and the window ({window})")
    _warn_about_clients(ckpt, dynamic_size)
    advertised = resolution_cm(ckpt, resolution)
    module = InferenceModel(build_model(ckpt), ckpt.input.mean, ckpt.input.std).eval()

    log.info(
        "exporting %s (%s, %d×%d windows, opset %d)", checkpoint, precision, window, window, opset
    )
    example = torch.rand(EXPORT_BATCH, channels, window, window)
    try:
        proto = _trace(module, example, opset, dynamic_size)
        if split:
            with torch.no_grad():
                features = module.features(example)
            part_protos = (
                _trace(BackboneGraph(module), example, opset, True, ("image", "features")),
                _trace(HeadGraph(module), features, opset, dynamic_size, ("features", "logits")),
            )
    except Exception as exc:  # the exporter raises many types; name the failing op
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GeosegError(
            f"{checkpoint}: ONNX export failed ({message}); rerun with -v for details"
        ) from exc
    actual_opset = _default_opset(proto)
    if actual_opset != opset:
        raise GeosegError(
            f"{checkpoint}: the exporter produced opset {actual_opset}, not {opset}; "
            f"try --opset {actual_opset}"
        )
    metadata = onnx_metadata(
        ckpt,
        stride=stride,
        resolution=advertised,
        precision=precision,
        opset=opset,
        dynamic_size=dynamic_size,
    )
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
                part = _for_old_runtimes(_convert(part, precision, workdir))
                del part.metadata_props[:]
                onnx.helper.set_model_props(
                    part, {"geoseg_part": json.dumps({"part": name, "model": Path(output).name})}
                )
                onnx.checker.check_model(part)
                onnx.save_model(part, part_tmp, save_as_external_data=False)
                split_info[name] = {"file": final.name, "sha256": file_hash(part_tmp)}
            geoseg = json.loads(metadata[GEOSEG_METADATA_KEY])
            geoseg["split_graphs"] = split_info
            metadata[GEOSEG_METADATA_KEY] = json.dumps(geoseg)
        proto = _for_old_runtimes(_convert(proto, precision, workdir))
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, metadata)
        onnx.checker.check_model(proto)
        onnx.save_model(proto, tmp, save_as_external_data=False)
        diff, agreement = _parity(module, tmp, shapes)
        log.info(
            "parity with PyTorch on %s: max abs diff %.3g, class agreement %.4f%%",
            " + ".join("×".join(map(str, s)) for s in shapes),
            diff,
            100 * agreement,
        )
        if precision == "fp32" and not diff <= tolerance:
            noise = _float32_error(module, shapes)
            raise GeosegError(
                f"{checkpoint}: the ONNX graph does not match PyTorch (max abs diff {diff:.3g} "
                f"> {tolerance:g}; PyTorch's own float32 error vs float64 is {noise:.3g}); "
                "nothing was written. If both are of the same order this is rounding: pass "
                "--tolerance; otherwise please report it"
            )
        split_diff = None
        if split:
            split_diff, feature_diff = _split_parity(module, *part_tmps, shapes)
            log.info(
                "shared-engine graphs: head(backbone(x)) vs PyTorch max abs diff %.3g; "
                "backbone on a %d×%d tile: max relative feature diff %.3g",
                split_diff,
                window + 2 * FEATURE_STRIDE,
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


def _warn_about_clients(info: ModelInfo, dynamic_size: bool) -> None:
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
