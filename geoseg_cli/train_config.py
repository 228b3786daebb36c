"""Training configuration: recipe defaults, TOML files, and the resume rules.

``--config FILE.toml`` holds flat ``key = value`` pairs (the field names, dashes or
underscores) and one table, ``[model_options]``, for the model's options.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geoseg_cli.distributed import DEVICES
from geoseg_cli.errors import UsageError
from geoseg_cli.raster import atomic_output
from geoseg_cli.recipe import CLASS_WEIGHTINGS, RECIPE_CHOICES, RECIPES, SAMPLERS, resolve_recipe
from geoseg_cli.tomlfile import parse_toml_value, read_toml, toml_value
from models import (
    BACKBONES,
    DEFAULT_BACKBONE,
    DEFAULT_MODEL,
    LOSS_KINDS,
    check_options,
    list_models,
)

#: Validation scores that can choose ``best.pt`` (higher is better).
BEST_METRICS = ("miou", "mf1", "oa")
#: Config keys that may change when resuming (they do not change what is learnt).
RESUME_OVERRIDES = ("chips_dir", "epochs", "device", "amp", "workers", "overwrite")
#: Per-invocation settings that are not saved with the run.
NOT_SAVED = ("overwrite",)


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    ``geoseg train`` resolves it from these defaults, an optional ``--config FILE.toml``
    (keys are the field names; dashes or underscores) and explicit flags, in that order,
    and saves the result as ``RUN_DIR/config.toml``, which ``--resume`` reads back.
    Settings marked *recipe* default to None and are filled from :attr:`recipe`
    (:mod:`geoseg_cli.recipe`) when the config is made; explicit values win.

    Attributes:
        chips_dir: Folder written by ``geoseg tile``.
        output: Run folder (created if missing).
        variant: Model name from the registry (``geoseg models``).
        backbone: ``resnet50`` (paper), ``resnet34`` or ``resnet18``.
        window: Training crop size in pixels (multiple of 16).
        epochs: Number of epochs.
        batch_size: Chips per step (per process under torchrun).
        recipe: ``paper`` (fine-tuning ImageNet weights), ``scratch`` (random initial
            weights) or ``auto``: paper with ``backbone_weights``, scratch without.
        lr: Initial learning rate (recipe; paper: 8.5e-5/√2).
        warmup_epochs: Linear learning-rate warm-up over so many epochs (recipe).
        weight_decay: L2 weight decay on weights; none on biases and norm parameters.
        bias_lr_factor: Learning-rate multiplier for biases.
        poly_power: Power of the polynomial decay over all steps.
        lr_step_epochs: Multiply the learning rate by ``lr_step_gamma`` every so many epochs.
        lr_step_gamma: That factor.
        loss: ``dice`` (paper: Dice + L_kl + L_dl), ``ce`` (class-weighted), ``dice+ce`` or
            ``partial`` (sparse labels: CE on labelled pixels + entropy + smoothness) (recipe).
        class_weighting: Cross-entropy class weights: ``median`` (stats.json's
            median-frequency weights), ``sqrt`` (their square roots) or ``none`` (recipe).
        flips: Random horizontal and vertical flips (p = 0.5 each).
        rot90: Random rotations by multiples of 90° (recipe).
        scale_jitter: Random zoom by a factor in [1/(1+s), 1+s], log-uniform (recipe).
        color_jitter: Random per-band gain in [1-j, 1+j] and offset in [-j, j] standard
            deviations (recipe).
        sampler: ``uniform`` (every chip equally often) or ``balanced`` (chips drawn so
            that every class is sampled alike, by its pixels) (recipe).
        min_epoch_samples: Chips drawn per epoch at least (0: one pass over the train
            chips) (recipe).
        best_metric: Validation score that selects ``best.pt``: miou, mf1 or oa.
        exclude_from_mean: Class names left out of the validation mF1/mIoU (e.g. clutter).
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).
        workers: Data-loading worker processes.
        seed: Seed of initialisation, chip order, augmentations and SCG sampling.
        backbone_weights: Local torchvision-format ImageNet ResNet weights, or None.
        model_options: Options of the variant's head (``models.model_options``), saved as
            the checkpoint's ``model.options``, e.g. ``{"keep": 0.3}`` for cdgc.
        overwrite: Replace an existing run in ``output``.
    """

    chips_dir: Path
    output: Path
    variant: str = DEFAULT_MODEL
    backbone: str = DEFAULT_BACKBONE
    window: int = 448
    epochs: int = 50
    batch_size: int = 4
    recipe: str = "auto"
    lr: float | None = None
    warmup_epochs: float | None = None
    weight_decay: float = 2e-5
    bias_lr_factor: float = 2.0
    poly_power: float = 0.9
    lr_step_epochs: int = 15
    lr_step_gamma: float = 0.85
    loss: str | None = None
    class_weighting: str | None = None
    flips: bool = True
    rot90: bool | None = None
    scale_jitter: float | None = None
    color_jitter: float | None = None
    sampler: str | None = None
    min_epoch_samples: int | None = None
    best_metric: str = "miou"
    exclude_from_mean: list[str] = field(default_factory=list)
    device: str = "auto"
    amp: bool = True
    workers: int = 2
    seed: int = 0
    backbone_weights: Path | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.chips_dir = Path(self.chips_dir)
        self.output = Path(self.output)
        if self.backbone_weights is not None:
            self.backbone_weights = Path(self.backbone_weights)
        recipe = RECIPES.get(self.resolved_recipe)
        for name, value in recipe.values().items() if recipe else ():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def resolved_recipe(self) -> str:
        """``paper`` or ``scratch``: the recipe, with ``auto`` decided by the weights."""
        return resolve_recipe(self.recipe, self.backbone_weights is not None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build a config from plain values (a TOML document, CLI flags), checking types.

        Keys may use dashes or underscores (``batch-size`` = ``batch_size``).

        Raises:
            UsageError: Unknown key, wrong type, or missing chips_dir/output.
        """
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in hints:
                raise UsageError(
                    f"{source}: unknown setting {key!r}; valid settings: {', '.join(hints)}"
                )
            values[name] = _coerce(name, hints[name], value, source)
        missing = [name for name in ("chips_dir", "output") if name not in values]
        if missing:
            raise UsageError(f"{source}: give CHIPS_DIR and -o RUN_DIR (missing {missing})")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings, None left out), the content of config.toml."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            data[f.name] = str(value) if isinstance(value, Path) else value
        return data

    def validate(self) -> None:
        """Check value ranges and names.

        Raises:
            UsageError: The first invalid setting, with the valid choices.
        """
        choices = {
            "recipe": list(RECIPE_CHOICES),
            "variant": list_models(),
            "backbone": list(BACKBONES),
            "loss": list(LOSS_KINDS),
            "class_weighting": list(CLASS_WEIGHTINGS),
            "sampler": list(SAMPLERS),
            "best_metric": list(BEST_METRICS),
            "device": list(DEVICES),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UsageError(
                    f"{name} {getattr(self, name)!r} is unknown; valid: {', '.join(valid)}"
                )
        try:
            check_options(self.variant, self.model_options)
        except ValueError as exc:
            raise UsageError(f"{exc}; see geoseg models --json") from exc
        if self.window < 16 or self.window % 16:
            raise UsageError(f"window {self.window} must be a multiple of 16 (e.g. 448)")
        positive = ("epochs", "batch_size", "lr", "lr_step_epochs", "lr_step_gamma")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = (
            "weight_decay",
            "bias_lr_factor",
            "poly_power",
            "workers",
            "warmup_epochs",
            "color_jitter",
            "min_epoch_samples",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.scale_jitter < 1:
            raise UsageError(f"scale_jitter must be in [0, 1), got {self.scale_jitter}")


def _coerce(name: str, hint: Any, value: Any, source: str) -> Any:
    """Check ``value`` against a TrainConfig field type (int, float, str, bool, Path, list)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    kind = next(t for t in options if t is not type(None))
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind in (str, Path):
        ok = isinstance(value, str | Path)
        value = kind(value) if ok else value
    elif typing.get_origin(kind) is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        value = {k.replace("-", "_"): v for k, v in value.items()} if ok else value
    elif typing.get_origin(kind) is list:
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    if not ok:
        expected = getattr(kind, "__name__", str(kind))
        raise UsageError(f"{source}: {name} must be {expected}, not {value!r}")
    return value


#: The one TOML table a config file may hold.
OPTIONS_TABLE = "model_options"


def parse_model_option(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` of ``--model-option`` into a key and its TOML value (else text).

    Raises:
        UsageError: No ``=`` or no key.
    """
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise UsageError(f"--model-option {item!r} is not KEY=VALUE (e.g. keep=0.3)")
    return key, parse_toml_value(text, "--model-option", UsageError)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config file: TrainConfig fields and an optional ``[model_options]`` table.

    Raises:
        UsageError: Missing file, invalid TOML, or other TOML tables (the config is flat).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such config file; check the --config path")
    data = read_toml(path, UsageError)
    tables = [k for k, v in data.items() if isinstance(v, dict) and k != OPTIONS_TABLE]
    if tables:
        raise UsageError(
            f"{path}: the config is flat key = value pairs plus a [{OPTIONS_TABLE}] table; "
            f"remove tables {tables}"
        )
    return data


def write_config_file(config: TrainConfig, path: str | os.PathLike) -> None:
    """Save ``config`` as TOML (readable by :func:`read_config_file`), atomically.

    The model options, if any, go in a ``[model_options]`` table at the end.
    """
    lines = ["# geoseg train configuration (resolved); reuse with --config", ""]
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_SAVED}
    options = values.pop(OPTIONS_TABLE)
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    if options:
        lines += ["", f"[{OPTIONS_TABLE}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in options.items()]
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def resume_config(
    run_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """The configuration of the run in ``run_dir``, with allowed overrides applied.

    Args:
        run_dir: A run folder holding ``config.toml`` and ``last.pt``.
        overrides: New values; only :data:`RESUME_OVERRIDES` may differ from the saved run.

    Raises:
        UsageError: No saved configuration, or an override that would change the run.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.toml"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no config.toml; --resume needs a folder from geoseg train")
    # runs saved before recipes existed used the paper's settings throughout
    saved_values = {"recipe": "paper", **read_config_file(path), "output": run_dir}
    saved = TrainConfig.from_dict(saved_values, str(path))
    values = saved.to_dict()
    hints = typing.get_type_hints(TrainConfig)
    for key, value in (overrides or {}).items():
        name = key.replace("-", "_")
        if name not in hints:
            raise UsageError(f"unknown setting {key!r}; valid settings: {', '.join(hints)}")
        if name == "output" or value is None:
            continue
        value = _coerce(name, hints[name], value, "resume")
        if name not in RESUME_OVERRIDES and value != getattr(saved, name):
            raise UsageError(
                f"{name.replace('_', '-')} cannot change when resuming (the run in {run_dir} "
                f"used {getattr(saved, name)!r}); only {', '.join(RESUME_OVERRIDES)} may, or "
                "start a new run"
            )
        values[name] = value
    return TrainConfig.from_dict(values, str(path))
