"""The checkpoint contract between train, predict, evaluate and export (DESIGN.md §3)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg_cli import __version__
from geoseg_cli.classes import ClassInfo
from geoseg_cli.errors import CheckpointError, first_line
from geoseg_cli.raster import atomic_output

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1

#: Top-level keys that only matter for ``--resume``.
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best_metric")


@dataclass
class InputSpec:
    """How raw raster values become model input.

    Attributes:
        bands: 1-based source band indexes, in model channel order.
        dtype: Source data type the model was trained on (``uint8``, ``uint16`` ...).
        scale: Factor that maps raw values to [0, 1] (e.g. 1/255).
        mean: Per-channel mean of the scaled values (standardization).
        std: Per-channel standard deviation of the scaled values.
        nodata: Source nodata value used in training, or None to rely on the raster's mask.
        resolution: Ground sampling distance of the training rasters in metres, if known.
    """

    bands: list[int]
    dtype: str
    scale: float
    mean: list[float]
    std: list[float]
    nodata: float | None = None
    resolution: float | None = None


@dataclass
class ModelSpec:
    """What :func:`models.create_model` needs to rebuild the network."""

    variant: str
    backbone: str
    num_classes: int
    in_channels: int
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ModelInfo:
    """Everything about a trained model except its weights.

    This is what an inference engine needs (classes, input scaling, window) and what ONNX
    export embeds as metadata, so ``.pt`` and ``.onnx`` models describe themselves alike.
    """

    model: ModelSpec
    classes: list[ClassInfo]
    ignore_index: int
    input: InputSpec
    window: int
    geoseg_version: str = __version__
    format_version: int = FORMAT_VERSION

    def describe(self) -> dict[str, Any]:
        """Plain-container description (JSON-serialisable)."""
        return {
            "format_version": self.format_version,
            "geoseg_version": self.geoseg_version,
            "model": dataclasses.asdict(self.model),
            "classes": [c.describe() for c in self.classes],
            "ignore_index": self.ignore_index,
            "input": dataclasses.asdict(self.input),
            "window": self.window,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str | os.PathLike = "<model>") -> ModelInfo:
        """Validate a description (checkpoint dict or ONNX metadata) and build the info.

        Raises:
            CheckpointError: Fields are missing, malformed or inconsistent.
        """
        path = Path(path)
        if not isinstance(data, dict) or "format_version" not in data:
            raise CheckpointError(
                f"{path} is not a geoseg model (no format_version); "
                "use a best.pt/last.pt written by geoseg train or an ONNX file from geoseg export"
            )
        version = data["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: model format {version!r} is newer than this geoseg understands "
                f"({FORMAT_VERSION}); upgrade geoseg"
            )
        try:
            model = ModelSpec(**_require(data, "model", dict, path))
            input_spec = InputSpec(**_require(data, "input", dict, path))
            classes = [
                ClassInfo(str(c["name"]), tuple(int(v) for v in c["color"]))
                for c in _require(data, "classes", list, path)
            ]
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed model metadata ({exc})") from exc
        if len(classes) != model.num_classes:
            raise CheckpointError(
                f"{path}: {len(classes)} class names for a {model.num_classes}-class model"
            )
        if (
            not len(input_spec.bands)
            == len(input_spec.mean)
            == len(input_spec.std)
            == (model.in_channels)
        ):
            raise CheckpointError(
                f"{path}: bands/mean/std do not match the model's {model.in_channels} channels"
            )
        return cls(
            model=model,
            classes=classes,
            ignore_index=int(_require(data, "ignore_index", int, path)),
            input=input_spec,
            window=int(_require(data, "window", int, path)),
            geoseg_version=str(data.get("geoseg_version", "unknown")),
            format_version=version,
        )


@dataclass(kw_only=True)
class Checkpoint(ModelInfo):
    """A model with its weights, and (for ``--resume``) the training state."""

    state_dict: dict[str, torch.Tensor]
    training: dict[str, Any] | None = None

    @property
    def info(self) -> ModelInfo:
        """The weight-free description of this checkpoint."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelInfo)}
        return ModelInfo(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The plain-container form that is written to disk."""
        data = self.describe()
        data["state_dict"] = self.state_dict
        data.update(self.training or {})
        return data


def _require(data: dict, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in data:
        raise CheckpointError(f"{path}: no {key!r} in the model description")
    if not isinstance(data[key], kind):
        raise CheckpointError(f"{path}: model field {key!r} has the wrong type")
    return data[key]


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Write ``ckpt`` atomically (temp file + rename), replacing any existing file."""
    import torch

    with atomic_output(path, overwrite=True) as tmp:
        try:
            torch.save(ckpt.to_dict(), tmp)
        except RuntimeError as exc:  # how torch's zip writer reports a failed write
            raise OSError(errno.EIO, first_line(exc), str(tmp)) from exc


def checkpoint_from_dict(data: Any, path: str | os.PathLike = "<checkpoint>") -> Checkpoint:
    """Validate a loaded checkpoint dictionary and build a :class:`Checkpoint`."""
    info = ModelInfo.from_dict(data, path)
    state_dict = _require(data, "state_dict", dict, Path(path))
    training = {k: data[k] for k in TRAINING_KEYS if k in data} or None
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(ModelInfo)}
    return Checkpoint(**fields, state_dict=state_dict, training=training)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and validate a checkpoint file on the CPU with ``weights_only=True``.

    A checkpoint holds only tensors and plain containers: opening one never runs code.

    Raises:
        CheckpointError: The file is missing, corrupt, foreign, or inconsistent.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        hint = next((p for p in (path / "best.pt", path / "last.pt") if p.is_file()), None)
        raise CheckpointError(
            f"{path} is a folder; give a checkpoint file"
            + (f", e.g. {hint}" if hint else " (a training run keeps best.pt and last.pt)")
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint file; use a .pt written by geoseg train"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: holds Python objects besides tensors and plain containers, which geoseg "
            "never unpickles; use a .pt written by geoseg train"
        ) from exc
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"{path}: not a readable geoseg checkpoint ({first_line(exc)}); "
            "use a .pt written by geoseg train"
        ) from exc
    return checkpoint_from_dict(data, path)


def create_model_from_spec(spec: ModelSpec) -> torch.nn.Module:
    """Instantiate the (untrained) network a :class:`ModelSpec` describes."""
    from models import create_model

    return create_model(
        spec.variant,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        backbone=spec.backbone,
        **spec.options,
    )


def build_model(ckpt: Checkpoint) -> torch.nn.Module:
    """Rebuild the network of ``ckpt`` with its weights, in eval mode.

    Raises:
        CheckpointError: The weights do not fit the described model (names the keys).
    """
    try:
        model = create_model_from_spec(ckpt.model)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint describes an unknown model: {exc}") from exc
    try:
        result = model.load_state_dict(ckpt.state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(
            f"checkpoint weights do not fit {ckpt.model.variant}/{ckpt.model.backbone}: "
            f"{str(exc).splitlines()[-1].strip()}"
        ) from exc
    problems = list(result.missing_keys)[:5] + list(result.unexpected_keys)[:5]
    if problems:
        raise CheckpointError(
            f"checkpoint weights do not fit {ckpt.model.variant}/{ckpt.model.backbone}: "
            f"missing or unexpected keys {problems}"
        )
    return model.eval()


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-256 of a model file (first ``length`` hex digits), used in output tags."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
