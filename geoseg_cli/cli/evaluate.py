"""``geoseg evaluate``: score a predicted class map against reference labels."""

from __future__ import annotations

import json
from typing import Any

import click

from geoseg_cli.cli.options import class_field_opt, class_value_opt, json_opt
from geoseg_cli.evaluate import evaluate as run_evaluation
from geoseg_cli.evaluate import resolve_classes
from geoseg_cli.matching import MATCH_METHODS


@click.command()
@click.argument("pred")
@click.argument("labels")
@click.option(
    "--classes",
    default=None,
    metavar="SPEC",
    help="Classes: a count (6), comma-separated names, a checkpoint (best.pt), "
    "stats.json, a classes file (TOML/JSON) or a preset (isprs). The last four also map "
    "LABELS as geoseg tile does: raw values ('value' in a classes file) or RGB colours to "
    "classes. Default: the names geoseg predict stored in PRED, else class ids found in "
    "the data.",
)
@click.option(
    "--ignore-index",
    type=click.IntRange(min=0),
    default=None,
    help="Label value that is not scored.  [default: from --classes, else 255]",
)
@click.option(
    "--boundary-erosion",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="R",
    help="Do not score label pixels within R px of another class (ISPRS uses 3).",
)
@click.option(
    "--exclude-from-mean",
    multiple=True,
    metavar="NAME",
    help="Class (name or id) left out of mF1 and mIoU, repeatable (ISPRS: clutter).",
)
@click.option(
    "--present-only",
    is_flag=True,
    help="Average mF1 and mIoU over the classes present in LABELS only (classes the "
    "reference lacks are listed but not averaged).",
)
@click.option(
    "--match",
    type=click.Choice(MATCH_METHODS),
    default=None,
    help="PRED is a cluster map (geoseg cluster): match each cluster to at most one class "
    "(Hungarian assignment, most matched pixels) before scoring; unmatched clusters count "
    "as errors. [default: score PRED's ids as they are]",
)
@class_field_opt
@class_value_opt
@json_opt
def evaluate(
    pred: str,
    labels: str,
    classes: str | None,
    ignore_index: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Score the class map PRED against the reference LABELS.

    Prints OA, per-class precision, recall, F1 and IoU, mF1 and mIoU; --json adds the
    confusion matrix (rows: reference, columns: prediction). PRED nodata pixels count as
    errors; LABELS nodata and ignore-index pixels are not scored. LABELS is a raster on
    PRED's grid holding class ids, or raw values or RGB colours that --classes maps (e.g.
    ISPRS colour-coded ground truth with --classes isprs), or vector polygons, rasterised
    on PRED's grid as geoseg tile does (--class-field/--class-value).

    \b
    Examples:
      geoseg evaluate scene_pred.tif scene_labels.tif
      geoseg evaluate pred.tif gt.tif --classes isprs --boundary-erosion 3 \\
          --exclude-from-mean clutter --json
      geoseg evaluate pred.tif buildings.geojson --classes run/best.pt
      geoseg evaluate pred.tif tile_labels.tif --classes run/best.pt --present-only
      geoseg evaluate clusters.tif labels.tif --match hungarian
    """
    spec = resolve_classes(classes, ignore_index) if classes is not None else None
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    if isinstance(spec, int):
        options["num_classes"] = spec
    else:
        options["classes"] = spec
    metrics = run_evaluation(pred, labels, **options)
    if as_json:
        click.echo(json.dumps(metrics.to_dict(), indent=2))
    else:
        click.echo(metrics.to_table())
