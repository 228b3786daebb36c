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
from geoseg_cli.inference.onnx_header import ProtobufError, read_onnx_header
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
_CUDA = "CUDAExecutionProvider"
#: Feature rows :func:`softmax_upsampled` turns into probabilities at a time.
CHUNK_CELLS = 4


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
    has_cuda = _CUDA in available
    if device == "cuda" and not has_cuda:
        raise UsageError(
            "--device cuda was asked for but this onnxruntime has no CUDA provider; "
            "install onnxruntime-gpu (pip install 'geoseg[gpu]') or use --device cpu"
        )
    if device != "cpu" and has_cuda:
        return [_CUDA, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options tuned for predict's one-batch-at-a-time calls.

    Full graph optimisation; ``threads`` intra-op threads (default: every usable core) that
    sleep between calls instead of spinning (spinning threads steal the cores numpy and
    GDAL need between runs); sequential execution; memory pattern and arena on; errors-only
    logging.
    """
    ort = import_onnx_dependency("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    return options


def create_session(
    path: str | os.PathLike, providers: list[str], threads: int | None = None
) -> Any:
    """Open an ONNX model in ONNX Runtime with :func:`session_options`.

    Args:
        path: The ``.onnx`` file.
        providers: Execution providers in order of preference.
        threads: Intra-op threads (None: every usable core).

    Raises:
        CheckpointError: The file is missing or is not a loadable ONNX model.
    """
    ort = import_onnx_dependency("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX model file; check the path")
    # cuDNN's exhaustive search would run again for every new tile shape
    configured = [
        (p, {"cudnn_conv_algo_search": "HEURISTIC"}) if p == _CUDA else p for p in providers
    ]
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads), providers=configured
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise CheckpointError(
            f"{path}: not a loadable ONNX model ({first_line(exc)}); "
            "use a file written by geoseg export onnx"
        ) from exc


def run_session(session: Any, array: np.ndarray, on_gpu: bool) -> np.ndarray:
    """The single output (float32) of a one-input session on ``array``.

    On CUDA the call goes through I/O binding: the output is allocated on the device and
    copied back once.
    """
    feed = np.ascontiguousarray(array, dtype=np.float32)
    name = session.get_inputs()[0].name
    if not on_gpu:
        (output,) = session.run(None, {name: feed})
    else:
        binding = session.io_binding()
        binding.bind_cpu_input(name, feed)
        binding.bind_output(session.get_outputs()[0].name, "cuda")
        session.run_with_iobinding(binding)
        (output,) = binding.copy_outputs_to_cpu()
    return output.astype(np.float32, copy=False)


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
        self.on_gpu = self.providers[0] == _CUDA
        if _CUDA in requested and _CUDA not in self.providers:
            message = (
                "onnxruntime could not start its CUDA provider (check the CUDA and cuDNN "
                "libraries onnxruntime-gpu needs)"
            )
            if device == "cuda":
                raise UsageError(f"{message}; use --device cpu")
            log.warning("%s; running %s on the CPU", message, self.path)
        if self.on_gpu and self.metadata.get("precision", "fp32") == "fp32":
            log.info(
                "%s runs in fp32 on CUDA; a model exported with geoseg export onnx --fp16 "
                "uses the GPU's half-precision units",
                self.path,
            )
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

    def _run_part(self, name: str, array: np.ndarray) -> np.ndarray:
        if name not in self._sessions:
            self._sessions[name] = create_session(self._parts[name], self.providers, self._threads)
        return run_session(self._sessions[name], array, self.on_gpu)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Features (N×F×H/16×W/16) of scaled input (N×C×H×W, multiples of 16)."""
        return self._run_part("backbone", batch)

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
        return self._run_part("head", features)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Mean over views of softmax(bilinear upsampling) of V×K×h×w logits, in numpy."""
        upsampled = softmax_upsampled(logits, self.output_stride)
        return upsampled[0] if len(upsampled) == 1 else upsampled.mean(axis=0)

    def feature_stream(self, view: View, rows: int, cols: int) -> StreamPush:
        """Not available: the backbone graph runs on tiles.

        Raises:
            NotImplementedError: Always (``streams`` is False).
        """
        raise NotImplementedError("ONNX models run the backbone on tiles, not row streams")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N×K×H×W float32) for scaled input windows (N×C×H×W float32).

        With the backbone and head graphs, the softmax and upsampling run in numpy (a
        channel softmax is slow in ONNX Runtime); the whole graph otherwise.

        Raises:
            UsageError: The model was exported for a fixed window and ``batch`` has another.
        """
        if self.input_size is not None and batch.shape[-2:] != (self.input_size,) * 2:
            raise UsageError(
                f"{self.path} was exported for {self.input_size}×{self.input_size} windows, "
                f"not {batch.shape[-2]}×{batch.shape[-1]}; use --window {self.input_size} or "
                "re-export with geoseg export onnx --dynamic-size"
            )
        if self.feature_channels is not None:
            return softmax_upsampled(self.head_logits(self.features(batch)), self.output_stride)
        return run_session(self.session, batch, self.on_gpu)


def softmax_upsampled(logits: np.ndarray, stride: int) -> np.ndarray:
    """Softmax over classes of the bilinear ``stride``× upsampling of N×K×h×w logits.

    As PyTorch's ``F.interpolate`` (align_corners=False) then ``softmax(dim=1)``. Columns
    are upsampled in one product; rows :data:`CHUNK_CELLS` feature rows at a time, each
    chunk going through the softmax while it is in cache.
    """
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    count, classes, height, width = logits.shape
    rows = _upsampling_matrix(height, stride)
    wide = logits @ _upsampling_matrix(width, stride).T  # N×K×h×(stride·w)
    out = np.empty((count, classes, height * stride, width * stride), dtype=np.float32)
    for first in range(0, height, CHUNK_CELLS):
        last = min(height, first + CHUNK_CELLS)
        # output rows of feature rows first..last mix only feature rows first-1..last
        low, high = max(0, first - 1), min(height, last + 1)
        chunk = rows[first * stride : last * stride, low:high] @ wide[:, :, low:high]
        chunk -= chunk.max(axis=1, keepdims=True)
        np.exp(chunk, out=chunk)
        chunk /= chunk.sum(axis=1, keepdims=True)
        out[:, :, first * stride : last * stride] = chunk
    return out


def describe_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """What ``geoseg info model.onnx`` shows.

    The geoseg description plus the graph's opset, inputs, outputs and the Deepness/GeoDeep
    metadata keys; for a backbone or head graph export wrote beside a model, which part of
    which model it is and the graph. Read from the file's header: neither ``onnx`` nor a
    session is needed.

    Raises:
        CheckpointError: The file is not a readable ONNX model or has no geoseg metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX model file; check the path")
    try:
        header = read_onnx_header(path)
    except (ProtobufError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({first_line(exc)}); "
            "use a file written by geoseg export onnx"
        ) from exc
    metadata = header["metadata"]
    graph = {
        "opset": header["opset"],
        "inputs": header["inputs"],
        "outputs": header["outputs"],
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
