"""Run an exported geoseg ONNX model with ONNX Runtime; numpy only, no PyTorch."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from geoseg_cli.checkpoint import ModelInfo, file_hash
from geoseg_cli.errors import CheckpointError, GeosegError, UsageError, first_line
from geoseg_cli.inference.runtime import StreamPush
from geoseg_cli.inference.tta import View

log = logging.getLogger(__name__)

#: Metadata key that holds geoseg's own model description (a JSON object).
GEOSEG_METADATA_KEY = "geoseg"
#: Metadata key of the backbone and head graphs export writes beside a model: which part of
#: which model file they are.
GEOSEG_PART_KEY = "geoseg_part"

#: ONNX Runtime log severity: 3 = errors only (no provider-fallback warnings).
_ORT_LOG_ERRORS_ONLY = 3
#: Output stride of the models exported before the metadata recorded it.
LEGACY_OUTPUT_STRIDE = 16


@functools.lru_cache(maxsize=8)
def _upsampling_matrix(size: int, stride: int) -> np.ndarray:
    """The (stride·size)×size matrix of bilinear upsampling along one axis.

    align_corners=False with the edges clamped, as PyTorch's ``F.interpolate`` does it.
    """
    source = np.maximum((np.arange(size * stride) + 0.5) / stride - 0.5, 0.0)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    weight = (source - low).astype(np.float32)
    matrix = np.zeros((size * stride, size), dtype=np.float32)
    np.add.at(matrix, (np.arange(size * stride), low), 1 - weight)
    np.add.at(matrix, (np.arange(size * stride), high), weight)
    return matrix


def import_onnx_dependency(name: str) -> ModuleType:
    """Import ``onnx``, ``onnxruntime`` or ``onnxscript``, or explain how to install it.

    Raises:
        GeosegError: The package is not installed (one line with the pip command).
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise GeosegError(
            f"{name} is not installed; ONNX support needs: pip install 'geoseg[onnx]'"
        ) from exc


def select_providers(device: str, available: list[str]) -> list[str]:
    """ONNX Runtime execution providers for ``device`` (``auto``, ``cpu`` or ``cuda``).

    CUDA is used only when the installed runtime offers it and ``device`` is not ``cpu``;
    CPU is always the fallback.

    Raises:
        UsageError: ``cuda`` was asked for but this onnxruntime has no CUDA provider.
    """
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise UsageError(
            "--device cuda was asked for but this onnxruntime has no CUDA provider; "
            "install onnxruntime-gpu (pip install 'geoseg[gpu]') or use --device cpu"
        )
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(
    path: str | os.PathLike, providers: list[str], threads: int | None = None
) -> Any:
    """Open an ONNX model in ONNX Runtime with full graph optimisation and quiet logs.

    Args:
        path: The ``.onnx`` file.
        providers: Execution providers in order of preference.
        threads: Intra-op threads (None: ONNX Runtime's default, one per physical core).

    Raises:
        CheckpointError: The file is missing or is not a loadable ONNX model.
    """
    ort = import_onnx_dependency("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX model file; check the path")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise CheckpointError(
            f"{path}: not a loadable ONNX model ({first_line(exc)}); "
            "use a file written by geoseg export onnx"
        ) from exc


def read_geoseg_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> dict[str, Any]:
    """The decoded ``geoseg`` metadata object of an ONNX model.

    Raises:
        CheckpointError: The key is missing (a foreign ONNX file or a part graph) or is not
            a JSON object.
    """
    part = _part_of(metadata)
    if part:
        raise CheckpointError(
            f"{path} is the {part['part']} graph of {part['model']}, not a model on its own; "
            f"give {Path(path).with_name(part['model'])} (it runs the parts beside it)"
        )
    if GEOSEG_METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path}: ONNX model has no geoseg metadata; export it with "
            "geoseg export onnx CHECKPOINT.pt (foreign ONNX models cannot be used)"
        )
    try:
        data = json.loads(metadata[GEOSEG_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: geoseg metadata is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: geoseg metadata is not a JSON object")
    return data


class OnnxRuntime:
    """An ONNX model exported by geoseg on ONNX Runtime (CUDA provider when usable).

    A :class:`~geoseg_cli.inference.runtime.Runtime`. An ONNX file written by ``geoseg
    export onnx`` describes itself: its ``geoseg`` metadata holds the same
    :class:`~geoseg_cli.checkpoint.ModelInfo` a checkpoint carries. The network runs in two
    halves (:meth:`features`, :meth:`head_logits`) when the backbone and head graphs the
    export wrote lie beside it and match the SHA-256 its metadata names.

    Attributes:
        info: The model description read from the ``geoseg`` metadata.
        model_hash: Short SHA-256 of the ``.onnx`` file.
        metadata: The decoded ``geoseg`` metadata (``info`` plus export details such as
            ``recommended_stride`` and ``precision``).
        input_size: The fixed window size of the graph, or None when it takes any size.
        providers: The execution providers in use.
        feature_channels: Feature channels when the backbone and head graphs are usable,
            else None (predict then uses the window engine).
        output_stride: Input pixels per feature position.
    """

    streams = False

    def __init__(
        self, path: str | os.PathLike, device: str = "auto", threads: int | None = None
    ) -> None:
        ort = import_onnx_dependency("onnxruntime")
        self.path = Path(path)
        requested = select_providers(device, ort.get_available_providers())
        self.session = create_session(self.path, requested, threads)
        self._threads = threads
        self.metadata = read_geoseg_metadata(
            self.path, self.session.get_modelmeta().custom_metadata_map
        )
        self.info = ModelInfo.from_dict(self.metadata, self.path)
        self.model_hash = file_hash(self.path)
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        if "CUDAExecutionProvider" in requested and "CUDAExecutionProvider" not in self.providers:
            message = (
                "onnxruntime could not start its CUDA provider (check the CUDA and cuDNN "
                "libraries onnxruntime-gpu needs)"
            )
            if device == "cuda":
                raise UsageError(f"{message}; use --device cpu")
            log.warning("%s; running %s on the CPU", message, self.path)
        (graph_input,) = self.session.get_inputs()
        self.input_name = graph_input.name
        height, width = graph_input.shape[-2:]
        self.input_size = height if isinstance(height, int) and height == width else None
        self.output_stride = int(self.metadata.get("output_stride", LEGACY_OUTPUT_STRIDE))
        self.feature_channels, self._parts = self._find_parts()
        self._sessions: dict[str, Any] = {}
        log.debug("ONNX Runtime engine (%s) for %s", ", ".join(self.providers), self.path)

    def _find_parts(self) -> tuple[int | None, dict[str, Path]]:
        """The backbone and head graphs named in the metadata, if present and matching."""
        split = self.metadata.get("split_graphs")
        if not isinstance(split, dict):
            return None, {}
        if split.get("head_output") != "logits":
            log.warning(
                "%s: its head graph comes from an earlier geoseg (it outputs probabilities, "
                "not logits): the shared engine is off; export the model again to use it",
                self.path,
            )
            return None, {}
        parts = {}
        for name in ("backbone", "head"):
            entry = split.get(name) if isinstance(split.get(name), dict) else {}
            # beside it under its own name (renamed with it), else under the exported name
            names = [f"{self.path.stem}.{name}.onnx", str(entry.get("file") or "")]
            found = [
                self.path.with_name(n) for n in names if n and self.path.with_name(n).is_file()
            ]
            if not found:
                log.debug("%s: no %s graph (%s) beside it", self.path, name, " or ".join(names))
                return None, {}
            part = found[0]
            if file_hash(part) != entry.get("sha256"):
                log.warning(
                    "%s does not belong to %s (another SHA-256 than the export wrote): the "
                    "shared engine is off; export the model again to fix it",
                    part,
                    self.path,
                )
                return None, {}
            parts[name] = part
        return int(split["feature_channels"]), parts

    def _run_part(self, name: str, feed_name: str, array: np.ndarray) -> np.ndarray:
        if name not in self._sessions:
            self._sessions[name] = create_session(self._parts[name], self.providers, self._threads)
        feed = {feed_name: np.ascontiguousarray(array, dtype=np.float32)}
        (output,) = self._sessions[name].run(None, feed)
        return output.astype(np.float32, copy=False)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Features (N×F×H/16×W/16) of scaled input (N×C×H×W, multiples of 16)."""
        return self._run_part("backbone", "image", batch)

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits (N×K×h×w) of the rest of the head on window features (N×F×h×w).

        Raises:
            UsageError: The model was exported for a fixed window and the features are of
                another one.
        """
        size = (features.shape[-2] * self.output_stride, features.shape[-1] * self.output_stride)
        if self.input_size is not None and size != (self.input_size,) * 2:
            raise UsageError(
                f"{self.path} was exported for {self.input_size}×{self.input_size} windows, "
                f"not {size[0]}×{size[1]}; use --window {self.input_size} or re-export with "
                "geoseg export onnx --dynamic-size"
            )
        return self._run_part("head", "features", features)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Mean over views of softmax(bilinear upsampling) of V×K×h×w logits, in numpy."""
        s = self.output_stride
        rows = _upsampling_matrix(logits.shape[-2], s)
        cols = _upsampling_matrix(logits.shape[-1], s)
        upsampled = rows @ np.ascontiguousarray(logits, dtype=np.float32) @ cols.T
        upsampled -= upsampled.max(axis=1, keepdims=True)
        np.exp(upsampled, out=upsampled)
        upsampled /= upsampled.sum(axis=1, keepdims=True)
        return upsampled[0] if len(upsampled) == 1 else upsampled.mean(axis=0)

    def feature_stream(self, view: View, rows: int, cols: int) -> StreamPush:
        """Not available: the backbone graph runs on tiles.

        Raises:
            NotImplementedError: Always (``streams`` is False).
        """
        raise NotImplementedError("ONNX models run the backbone on tiles, not row streams")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N×K×H×W float32) for scaled input windows (N×C×H×W float32).

        Raises:
            UsageError: The model was exported for a fixed window and ``batch`` has another.
        """
        if self.input_size is not None and batch.shape[-2:] != (self.input_size,) * 2:
            raise UsageError(
                f"{self.path} was exported for {self.input_size}×{self.input_size} windows, "
                f"not {batch.shape[-2]}×{batch.shape[-1]}; use --window {self.input_size} or "
                "re-export with geoseg export onnx --dynamic-size"
            )
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        (probabilities,) = self.session.run(None, feed)
        return probabilities.astype(np.float32, copy=False)


def describe_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """What ``geoseg info model.onnx`` shows.

    The geoseg description plus the graph's opset, inputs, outputs and the Deepness/GeoDeep
    metadata keys; for a backbone or head graph export wrote beside a model, which part of
    which model it is and the graph.

    Raises:
        CheckpointError: The file is not a readable ONNX model or has no geoseg metadata.

    """
    onnx = import_onnx_dependency("onnx")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX model file; check the path")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for foreign files
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); "
            "use a file written by geoseg export onnx"
        ) from exc
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    graph = {
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [_value_info(v) for v in proto.graph.input],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "metadata": {k: v for k, v in metadata.items() if k != GEOSEG_METADATA_KEY},
        "size_bytes": path.stat().st_size,
        "sha256": file_hash(path),
    }
    part = _part_of(metadata)
    if part:
        return {"part": part["part"], "part_of": part["model"], "onnx": graph}
    geoseg = read_geoseg_metadata(path, metadata)
    info = ModelInfo.from_dict(geoseg, path)
    description = info.describe()
    description.update({k: v for k, v in geoseg.items() if k not in description})
    description["onnx"] = graph
    return description


def _part_of(metadata: dict[str, str]) -> dict[str, str] | None:
    """``{"part": "backbone" or "head", "model": file name}`` of a part graph, else None."""
    try:
        part = json.loads(metadata.get(GEOSEG_PART_KEY, "null"))
    except json.JSONDecodeError:
        return None
    if isinstance(part, dict) and {"part", "model"} <= part.keys():
        return {"part": str(part["part"]), "model": str(part["model"])}
    return None


def _value_info(value: Any) -> dict[str, Any]:
    """Name, element type and shape (ints or symbolic names) of a graph input/output."""
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    return {
        "name": value.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
        "shape": shape,
    }
