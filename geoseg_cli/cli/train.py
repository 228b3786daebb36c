"""``geoseg train``: train an SCG-Net variant on a ``geoseg tile`` folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from geoseg_cli.cli.options import device_opt, overwrite_opt
from geoseg_cli.distributed import torchrun_env
from geoseg_cli.errors import UsageError
from geoseg_cli.recipe import CLASS_WEIGHTINGS, RECIPE_CHOICES, RECIPES, SAMPLERS
from geoseg_cli.train import train as run_training
from geoseg_cli.train_config import (
    BEST_METRICS,
    OPTIONS_TABLE,
    TrainConfig,
    parse_model_option,
    read_config_file,
    resume_config,
)
from models import BACKBONES, LOSS_KINDS, VARIANTS, model_options

log = logging.getLogger(__name__)


def _options_help() -> str:
    """The variants' options with their defaults, for ``--model-option``'s help."""
    groups: dict[str, list[str]] = {}
    for name in VARIANTS:
        options = model_options(name)
        listed = ", ".join(
            f"{key}={'unset' if value is None else json.dumps(value)}"
            for key, value in options.items()
        )
        groups.setdefault(listed, []).append(name)
    ordered = sorted(groups.items(), key=lambda item: len(item[1]))
    parts = [f"{', '.join(names)}: {listed}" for listed, names in ordered[:-1]]
    parts.append(f"the other variants: {ordered[-1][0]}")
    return "Defaults: " + "; ".join(parts) + "."


_OPTIONS_HELP = _options_help()


def _parse_model_options(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, Any]:
    try:
        return dict(parse_model_option(item) for item in values)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
@click.argument("chips_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Run folder (created if missing)."
)
@click.option(
    "--variant",
    "--model",
    "variant",
    default=TrainConfig.variant,
    show_default=True,
    help="Model variant (list them with `geoseg models`); --model is timm's spelling.",
)
@click.option(
    "--backbone",
    type=click.Choice(list(BACKBONES)),
    default=TrainConfig.backbone,
    show_default=True,
    help="ResNet trunk; resnet50 is the paper's, resnet18 is fast on CPU.",
)
@click.option(
    "--window",
    type=click.IntRange(min=16),
    default=TrainConfig.window,
    show_default=True,
    help="Training crop size in pixels (multiple of 16).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=TrainConfig.batch_size,
    show_default=True,
    help="Chips per step (per process under torchrun).",
)
@click.option(
    "--recipe",
    type=click.Choice(RECIPE_CHOICES),
    default=TrainConfig.recipe,
    show_default=True,
    help="Defaults of the options marked [recipe]: paper (the paper's fine-tuning of "
    "ImageNet weights) or scratch (random initial weights); auto = paper with "
    "--backbone-weights, scratch without.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Initial learning rate, decayed by poly({TrainConfig.poly_power}) and "
    f"×{TrainConfig.lr_step_gamma} every {TrainConfig.lr_step_epochs} epochs. [recipe: paper "
    f"8.5e-5/√2 ≈ {RECIPES['paper'].lr:.3g}, scratch {RECIPES['scratch'].lr:g}]",
)
@click.option(
    "--warmup-epochs",
    type=click.FloatRange(min=0),
    default=None,
    help="Linear learning-rate warm-up over so many epochs. [recipe: paper "
    f"{RECIPES['paper'].warmup_epochs:g}, scratch {RECIPES['scratch'].warmup_epochs:g}]",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    default=TrainConfig.weight_decay,
    show_default=True,
    help="Weight decay on weights (not on biases and norm parameters).",
)
@click.option(
    "--loss",
    type=click.Choice(LOSS_KINDS),
    default=None,
    help="dice is the paper's (Dice + L_kl + L_dl); ce uses class weights (see "
    "--class-weighting); dice+ce sums both; partial is for sparse labels (geoseg tile "
    "--sparse): class-weighted CE on the labelled pixels + entropy of the unlabelled ones + "
    "colour smoothness. The SCG terms are always added. cdgc scores its refined logits with "
    "OHEM cross-entropy instead and adds its coarse and auxiliary cross-entropies (weights: "
    "--model-option). [recipe: paper "
    f"{RECIPES['paper'].loss}, scratch {RECIPES['scratch'].loss}]",
)
@click.option(
    "--class-weighting",
    type=click.Choice(CLASS_WEIGHTINGS),
    default=None,
    help="Cross-entropy class weights: median = stats.json's median-frequency weights, sqrt "
    f"= their square roots. [recipe: paper {RECIPES['paper'].class_weighting}, scratch "
    f"{RECIPES['scratch'].class_weighting}]",
)
@click.option(
    "--flips/--no-flips", default=TrainConfig.flips, show_default=True, help="Random flips (p=0.5)."
)
@click.option(
    "--rot90/--no-rot90",
    default=None,
    help="Random 90° turns. [recipe: paper no, scratch yes]",
)
@click.option(
    "--scale-jitter",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    metavar="S",
    help="Random zoom by a factor in [1/(1+S), 1+S]. [recipe: paper "
    f"{RECIPES['paper'].scale_jitter:g}, scratch {RECIPES['scratch'].scale_jitter:g}]",
)
@click.option(
    "--color-jitter",
    type=click.FloatRange(min=0),
    default=None,
    metavar="J",
    help="Random per-band gain in [1-J, 1+J] and offset in [-J, J] standard deviations. "
    f"[recipe: paper {RECIPES['paper'].color_jitter:g}, scratch "
    f"{RECIPES['scratch'].color_jitter:g}]",
)
@click.option(
    "--sampler",
    type=click.Choice(SAMPLERS),
    default=None,
    help="uniform: every chip equally often; balanced: chips drawn so that each class is "
    f"sampled alike (rare classes more often). [recipe: paper {RECIPES['paper'].sampler}, "
    f"scratch {RECIPES['scratch'].sampler}]",
)
@click.option(
    "--min-epoch-samples",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Draw at least N chips per epoch (repeating chips on small data); 0 = one pass. "
    f"[recipe: paper {RECIPES['paper'].min_epoch_samples}, scratch "
    f"{RECIPES['scratch'].min_epoch_samples}]",
)
@click.option(
    "--best-metric",
    type=click.Choice(BEST_METRICS),
    default=TrainConfig.best_metric,
    show_default=True,
    help="Validation score that selects best.pt.",
)
@click.option(
    "--exclude-from-mean",
    multiple=True,
    metavar="NAME",
    help="Class left out of the validation mF1/mIoU (repeatable), e.g. clutter.",
)
@device_opt
@click.option(
    "--amp/--no-amp",
    default=TrainConfig.amp,
    show_default=True,
    help="Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=TrainConfig.workers,
    show_default=True,
    help="Data-loading worker processes.",
)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True, help="Random seed.")
@click.option(
    "--backbone-weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=(
        "Local torchvision/timm ImageNet ResNet weights (.pth, or .safetensors with the "
        "safetensors package); nothing is downloaded."
    ),
)
@click.option(
    "--model-option",
    "model_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_parse_model_options,
    help="Option of the variant's head (repeatable; VALUE as in TOML; saved in the "
    f"checkpoint; also a [{OPTIONS_TABLE}] table in --config), e.g. --model-option "
    f"dynamic_sampling=false. {_OPTIONS_HELP}",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of settings (keys as in RUN_DIR/config.toml); flags override it.",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="RUN_DIR",
    help="Continue the run in RUN_DIR from its last.pt, exactly where it stopped.",
)
@overwrite_opt
@click.pass_context
def train(
    ctx: click.Context,
    chips_dir: Path | None,
    config_file: Path | None,
    resume: Path | None,
    **options: Any,
) -> None:
    """Train a model on chips from `geoseg tile`.

    Writes RUN_DIR/best.pt (best validation score), last.pt (full state for --resume),
    metrics.csv, config.toml and curves.png (with matplotlib). Options marked [recipe]
    default to the recipe's value: the SCG-Net paper's fine-tuning recipe with
    --backbone-weights, a from-scratch recipe without (--recipe). Under torchrun the same
    command trains with DDP (one process per GPU).

    \b
    Examples:
      geoseg train chips/ -o runs/exp1
      geoseg train chips/ -o runs/cpu --backbone resnet18 --window 224 --epochs 5
      geoseg train chips/ -o runs/cdgc --variant cdgc --model-option keep=0.3
      geoseg train chips/ -o runs/ft --backbone-weights resnet50.pth   # recipe paper
      geoseg train --config exp.toml -o runs/exp2 --lr 1e-4
      geoseg train --resume runs/exp1 --epochs 80
      geoseg train sparse_chips/ -o runs/points --loss partial
      torchrun --nproc_per_node=4 -m geoseg_cli train chips/ -o runs/ddp
    """
    flags = {
        name: value
        for name, value in options.items()
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    if "exclude_from_mean" in flags:
        flags["exclude_from_mean"] = list(flags["exclude_from_mean"])
    settings = read_config_file(config_file) if config_file else {}
    if "model_options" in flags:  # per key: a flag overrides the file's table
        flags["model_options"] = {**settings.get(OPTIONS_TABLE, {}), **flags["model_options"]}
    settings = {**settings, **flags}
    if chips_dir is not None:
        settings["chips_dir"] = chips_dir
    if resume is not None:
        if settings.get("output") not in (None, resume):
            raise UsageError("--resume continues in RUN_DIR; leave out -o or give the same folder")
        config = resume_config(resume, settings)
    else:
        if "chips_dir" not in settings or settings.get("output") is None:
            raise UsageError("give CHIPS_DIR and -o RUN_DIR (or --resume RUN_DIR)")
        config = TrainConfig.from_dict(settings, str(config_file or "options"))
    result = run_training(config, resume=resume is not None)
    if torchrun_env().is_main:
        log.info(
            "best %s %.4f at epoch %d: %s",
            result.best_metric,
            result.best_value,
            result.best_epoch,
            result.best_path,
        )
