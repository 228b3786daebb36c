"""``geoseg cluster``: unsupervised segmentation of a scene, to start labelling from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from geoseg_cli.cli.options import (
    bidx_opt,
    creation_options_opt,
    device_opt,
    json_opt,
    overwrite_opt,
)
from geoseg_cli.cluster import MIN_WINDOW, ClusterOptions

_DEFAULTS = ClusterOptions()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_", metavar="INPUT")
@click.option(
    "-k",
    "--clusters",
    type=click.IntRange(2, 255),
    default=_DEFAULTS.clusters,
    show_default=True,
    help="Number of clusters.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    help="Output cluster map (GeoTIFF). [default: <stem>_clusters.tif in the current folder]",
)
@click.option(
    "--superpixels",
    type=click.IntRange(min=4),
    default=_DEFAULTS.superpixels,
    show_default=True,
    help="Superpixels per window (the seeds of the neural superpixels, the graph's nodes).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=_DEFAULTS.epochs,
    show_default=True,
    help="Passes over the training windows.",
)
@click.option(
    "--window",
    type=click.IntRange(min=MIN_WINDOW),
    default=_DEFAULTS.window,
    show_default=True,
    help="Window size in pixels (even), for training and prediction.",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=None,
    help="Step between prediction windows (overlap = window - stride). [default: window/2]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_DEFAULTS.batch_size,
    show_default=True,
    help="Windows per training step and per prediction pass.",
)
@click.option(
    "--train-windows",
    type=click.IntRange(min=1),
    default=_DEFAULTS.train_windows,
    show_default=True,
    help="Windows drawn at random from the scene to train on (held in memory).",
)
@click.option(
    "--lr", type=float, default=_DEFAULTS.lr, show_default=True, help="Adam learning rate."
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=_DEFAULTS.seed,
    show_default=True,
    help="Seed of the window draw, the initial weights and the augmentations (the same "
    "seed gives the same clusters on the same machine).",
)
@bidx_opt
@click.option(
    "--nodata",
    type=float,
    default=None,
    help="Input nodata value, overriding the raster's (pixels equal to it in every band "
    "are left out of training and written as 255). [default: the raster's mask/nodata]",
)
@device_opt
@click.option(
    "--classes-out",
    default=None,
    help="Also write a classes file (.toml or .json) naming the clusters cluster_0... "
    "with the colours of the colour table, to rename and use with geoseg tile --classes.",
)
@creation_options_opt
@overwrite_opt
@json_opt
def cluster(
    input_: str,
    clusters: int,
    output: str | None,
    superpixels: int,
    epochs: int,
    window: int,
    stride: int | None,
    batch_size: int,
    train_windows: int,
    lr: float,
    seed: int,
    bidx: tuple[int, ...],
    nodata: float | None,
    device: str,
    classes_out: str | None,
    creation_options: dict[str, str],
    overwrite: bool,
    as_json: bool,
) -> None:
    """Cluster a scene into K spatially coherent segments without labels.

    Prints the paths written (with --json, one JSON object).
    The network (after SGSeg, Eliasof et al. 2022: neural superpixels, a graph neural
    network over them, mutual-information maximisation) trains on random windows of
    INPUT itself: it learns to give each pixel the same cluster in two augmented views of
    its window. It then runs over the whole raster as geoseg predict does (overlapping
    windows, blended soft cluster probabilities, memory independent of the raster height).
    The uint8 cluster map keeps INPUT's CRS, transform and size, nodata is 255, and it
    carries a colour table. Cluster ids are arbitrary: score them against labels with
    geoseg evaluate --match hungarian, or name them in the --classes-out file.

    \b
    Examples:
      geoseg cluster scene.tif -k 6 -o clusters.tif
      geoseg cluster scene.tif -k 6 -o clusters.tif --superpixels 100 --epochs 20
      geoseg cluster scene.tif -k 4 -o clusters.tif --classes-out classes.toml
      geoseg evaluate clusters.tif labels.tif --match hungarian
    """
    from geoseg_cli.cluster import cluster_raster, default_output

    options = ClusterOptions(
        clusters=clusters,
        superpixels=superpixels,
        epochs=epochs,
        window=window,
        stride=stride,
        batch_size=batch_size,
        train_windows=train_windows,
        lr=lr,
        seed=seed,
        bands=bidx or None,
        nodata=nodata,
        device=device,
        creation_options=creation_options,
        overwrite=overwrite,
        classes_out=Path(classes_out) if classes_out else None,
    )
    result = cluster_raster(input_, output or default_output(input_), options)
    if as_json:
        fields = dataclasses.asdict(result)
        record = {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}
        click.echo(json.dumps({"input": input_, **record}))
        return
    for path in (result.output, result.classes_out):
        if path is not None:
            click.echo(path)
