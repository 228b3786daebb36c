"""Training recipes: the paper's fine-tuning defaults and a recipe for training from scratch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from geoseg_cli.train_config import TrainConfig

#: The paper's initial learning rate (8.5e-5/√2), tuned for fine-tuning ImageNet weights.
PAPER_LR = 8.5e-5 / math.sqrt(2)
#: Values of ``recipe``.
RECIPE_CHOICES = ("auto", "paper", "scratch")
#: Chip samplers: one pass over the chips in random order, or class-balanced draws.
SAMPLERS = ("uniform", "balanced")
#: Class weights of the cross-entropy term: stats.json's median-frequency weights, their
#: square roots (milder), or none.
CLASS_WEIGHTINGS = ("median", "sqrt", "none")
#: Below this learning rate, randomly initialised weights learn too slowly.
SCRATCH_MIN_LR = 2e-4
#: Above this learning rate, pretrained weights are overwritten rather than fine-tuned.
FINE_TUNE_MAX_LR = 5e-4


@dataclass(frozen=True)
class Recipe:
    """Defaults of the recipe-dependent training settings (the paper's by default).

    A recipe supplies the settings that :class:`~geoseg_cli.train_config.TrainConfig` leaves
    unset (learning rate, warm-up, loss, augmentation, chip sampling, epoch length); explicit
    flags and ``--config`` keys always win. ``auto`` (the default) picks ``paper`` when
    ``--backbone-weights`` are given and ``scratch`` otherwise: the paper's learning rate
    fine-tunes ImageNet weights and barely moves randomly initialised ones.
    """

    lr: float = PAPER_LR
    warmup_epochs: float = 0.0
    loss: str = "dice"
    class_weighting: str = "median"
    rot90: bool = False
    scale_jitter: float = 0.0
    color_jitter: float = 0.0
    sampler: str = "uniform"
    min_epoch_samples: int = 0

    def values(self) -> dict[str, Any]:
        """The settings as a dict keyed by ``TrainConfig`` field names."""
        return dataclasses.asdict(self)


#: The recipes by name: the paper's is the default of every setting.
RECIPES: dict[str, Recipe] = {
    "paper": Recipe(),
    "scratch": Recipe(
        lr=3e-3,
        warmup_epochs=1.0,
        loss="dice+ce",
        class_weighting="none",
        rot90=True,
        scale_jitter=0.25,
        color_jitter=0.2,
        sampler="balanced",
        min_epoch_samples=2048,
    ),
}


def resolve_recipe(name: str, has_weights: bool) -> str:
    """``paper`` or ``scratch`` for a ``recipe`` value (``auto`` depends on the weights)."""
    if name == "auto":
        return "paper" if has_weights else "scratch"
    return name


def lr_mismatch(lr: float, has_weights: bool) -> str | None:
    """A warning when the learning rate does not suit how the backbone starts, else None."""
    if not has_weights and lr < SCRATCH_MIN_LR:
        return (
            f"learning rate {lr:.3g} is a fine-tuning rate (the paper's is {PAPER_LR:.3g}) but "
            "there are no --backbone-weights: randomly initialised weights barely learn at "
            f"it; use --recipe scratch (lr {RECIPES['scratch'].lr:g} with warm-up) or give "
            "--backbone-weights"
        )
    if has_weights and lr > FINE_TUNE_MAX_LR:
        return (
            f"learning rate {lr:.3g} is a from-scratch rate but --backbone-weights are given: "
            "it can wash out the pretrained features; use --recipe paper "
            f"(lr {PAPER_LR:.3g}) or a lower --lr"
        )
    return None


def loss_class_weights(config: TrainConfig, median_weights: list[float]) -> list[float] | None:
    """The cross-entropy class weights of a resolved config (None: unweighted or Dice only)."""
    if config.loss == "dice" or config.class_weighting == "none":
        return None
    if config.class_weighting == "sqrt":
        return [math.sqrt(w) for w in median_weights]
    return list(median_weights)


def recipe_report(config: TrainConfig) -> tuple[str, str | None]:
    """The log line naming a resolved config's recipe and settings, and a learning-rate warning.

    Args:
        config: A resolved :class:`~geoseg_cli.train_config.TrainConfig`.

    Returns:
        The line, and the :func:`lr_mismatch` warning or None.
    """
    has_weights = config.backbone_weights is not None
    chosen = f"recipe {config.resolved_recipe}"
    if config.recipe == "auto":
        chosen = f"recipe auto: {config.resolved_recipe} "
        chosen += f"({'with' if has_weights else 'no'} --backbone-weights)"
    augment = ["flips"] if config.flips else []
    augment += ["rot90"] if config.rot90 else []
    if config.scale_jitter:
        augment.append(f"scale ±{config.scale_jitter:g}")
    if config.color_jitter:
        augment.append(f"colour ±{config.color_jitter:g}")
    weights = "" if config.loss == "dice" else f" ({config.class_weighting} class weights)"
    warmup = f" with {config.warmup_epochs:g} epoch(s) of warm-up" if config.warmup_epochs else ""
    epoch = (
        f"at least {config.min_epoch_samples} samples per epoch"
        if config.min_epoch_samples
        else "one pass over the chips per epoch"
    )
    line = (
        f"{chosen}: lr {config.lr:.3g}{warmup}, loss {config.loss}{weights}, augmentation "
        f"{'+'.join(augment) or 'none'}, {config.sampler} sampler, {epoch}"
    )
    return line, lr_mismatch(config.lr, has_weights)
