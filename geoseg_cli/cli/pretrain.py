"""``geoseg pretrain``: self-supervised backbone weights from unlabelled rasters."""

from __future__ import annotations

from pathlib import Path

import click

from geoseg_cli.cli.options import bidx_opt, device_opt, overwrite_opt
from geoseg_cli.pretrain import PretrainConfig
from geoseg_cli.pretrain import pretrain as run_pretrain
from models import BACKBONES


@click.command()
@click.argument("rasters", nargs=-1, required=True, metavar="RASTER...")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Weights file to write (.pt), for geoseg train --backbone-weights.",
)
@click.option(
    "--backbone",
    type=click.Choice(list(BACKBONES)),
    default=PretrainConfig.backbone,
    show_default=True,
    help="ResNet trunk: the --backbone of the geoseg train run that loads the weights.",
)
@click.option(
    "--window",
    type=click.IntRange(min=16),
    default=PretrainConfig.window,
    show_default=True,
    help="Window side in pixels (multiple of 16).",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=PretrainConfig.steps, show_default=True
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=PretrainConfig.batch_size,
    show_default=True,
    help="Windows per step.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=PretrainConfig.lr,
    show_default=True,
    help="Peak AdamW learning rate (5 % warm-up, then polynomial decay).",
)
@click.option(
    "--mask-ratio",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=PretrainConfig.mask_ratio,
    show_default=True,
    help="Share of 16×16 px patches masked per window.",
)
@bidx_opt
@click.option(
    "--scale",
    type=float,
    default=None,
    help="Factor mapping raw values to ~[0,1] [default: as geoseg tile: 1/255 uint8, "
    "1/10000 other integers, 1 float].",
)
@click.option(
    "--max-nodata",
    type=click.FloatRange(0, 1, max_open=True),
    default=PretrainConfig.max_nodata,
    show_default=True,
    help="Skip windows with a larger nodata fraction.",
)
@click.option(
    "--seed", type=int, default=PretrainConfig.seed, show_default=True, help="Random seed."
)
@device_opt
@overwrite_opt
def pretrain(rasters: tuple[str, ...], bidx: tuple[int, ...], **options: object) -> None:
    """Pre-train a backbone on unlabelled RASTERs by masked reconstruction (SimMIM).

    Random windows of the rasters are standardized, 60 % of their 16×16 px patches are
    masked and the backbone learns to reconstruct them. The output holds the backbone's
    weights with torchvision's key names: give it to `geoseg train --backbone-weights`
    with the same --backbone and bands. No label is needed, so the rasters can include
    the area you will predict.

    \b
    Examples:
      geoseg pretrain rasters/*.tif -o backbone.pt --backbone resnet18 --steps 3000
      geoseg train chips/ -o runs/ssl --backbone resnet18 --backbone-weights backbone.pt \\
          --recipe scratch
    """
    config = PretrainConfig(rasters=list(rasters), bands=list(bidx) or None, **options)
    run_pretrain(config)
