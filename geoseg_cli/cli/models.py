"""``geoseg models``: the registered model variants and their sizes."""

from __future__ import annotations

import json

import click

from geoseg_cli.cli.options import json_opt
from models import (
    BACKBONES,
    DEFAULT_BACKBONE,
    REFERENCE_BANDS,
    REFERENCE_CLASSES,
    describe_models,
)


@click.command()
@click.option(
    "--classes",
    "num_classes",
    type=click.IntRange(min=1),
    default=REFERENCE_CLASSES,
    show_default=True,
    help="Number of output classes the parameter counts are computed for.",
)
@click.option(
    "--bands",
    type=click.IntRange(min=1),
    default=REFERENCE_BANDS,
    show_default=True,
    help="Number of input bands the parameter counts are computed for.",
)
@click.option(
    "--backbone",
    type=click.Choice(list(BACKBONES)),
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="ResNet trunk (resnet50 is the paper's; resnet18/34 are lighter for CPUs).",
)
@json_opt
def models(num_classes: int, bands: int, backbone: str, as_json: bool) -> None:
    """List the model variants with their parameter counts.

    SCG-Net's (paper Table III), mscg-gcn (MSCG-Net's three views) and cdgc (class-wise
    dynamic graph convolution).

    \b
    Examples:
      geoseg models
      geoseg models --classes 6 --bands 4 --backbone resnet18 --json
    """
    rows = describe_models(num_classes, bands, backbone)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "head", "SCG", "GNN1", "GNN2", "residual", "parameters")
    residual = {True: "yes", False: "no", None: "-"}
    table = [
        (
            row["name"] + (" (default)" if row["default"] else ""),
            row["head"],
            row["scg"] or "-",
            row["gnn1"] or "-",
            row["gnn2"] or "-",
            residual[row["residual"]],
            f"{row['parameters']:,}",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths[:-1], strict=True)]
        click.echo("  ".join([*cells, line[-1].rjust(widths[-1])]))
    click.echo(f"\n{backbone} backbone, {bands} bands, {num_classes} classes")
