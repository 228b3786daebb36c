"""``geoseg tile``: georeferenced training chips from rasters and polygons."""

from __future__ import annotations

import json
from typing import Any

import click

from geoseg_cli.cli.options import (
    bidx_opt,
    class_field_opt,
    class_value_opt,
    json_opt,
    overwrite_opt,
)
from geoseg_cli.sparse import LINE_BUFFER, POINT_BUFFER
from geoseg_cli.splits import SPLITS
from geoseg_cli.tiling import DEFAULT_MAX_NODATA, DEFAULT_SIZE, DEFAULT_VAL_FRACTION
from geoseg_cli.tiling import tile as run_tile


def expand_variadic_option(args: list[str], name: str) -> list[str]:
    """Rewrite ``NAME a b c`` as ``NAME a NAME b NAME c``.

    So a shell glob after an option (``--labels labels/*.tif``) fills that option instead of
    the positional arguments.
    """
    out: list[str] = []
    taking = False
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg == name:
            taking = False
            out.append(arg)
            continue
        if arg.startswith("-") and arg != "-":
            taking = False
        elif taking:
            out.append(name)
        elif out and out[-1] == name:
            taking = True
        out.append(arg)
    return out


class _TileCommand(click.Command):
    """Accepts several values after one ``--labels`` (``--labels a.tif b.tif``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_variadic_option(args, "--labels"))


@click.command(cls=_TileCommand)
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option(
    "--labels",
    "labels",
    multiple=True,
    required=True,
    metavar="LABELS...",
    help="Label file(s), one per IMAGE in the same order; every value after --labels up to "
    "the next option is a label file. "
    "Class-index raster, RGB raster (needs --classes) or vector polygons: GeoJSON, or "
    "GeoPackage, Shapefile, FlatGeobuf... with pip install 'geoseg[vector]' (one vector file "
    "may serve all images).",
)
@click.option(
    "-o", "--output", "outdir", required=True, type=click.Path(), help="Output folder (new)."
)
@click.option(
    "--size",
    type=click.IntRange(min=1),
    default=DEFAULT_SIZE,
    show_default=True,
    help="Chip size in pixels.",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=None,
    help="Grid step in pixels (default: --size; smaller = overlap).",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Draw N random chips (seeded) instead of a grid.",
)
@click.option(
    "--classes",
    default=None,
    metavar="FILE|isprs",
    help="Classes file (TOML or JSON: names, colors, value, ignore_index, ignore_colors) or "
    "preset 'isprs'. Default: inferred from the labels.",
)
@class_field_opt
@class_value_opt
@bidx_opt
@click.option(
    "--max-nodata",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MAX_NODATA,
    show_default=True,
    help="Skip chips with a larger nodata fraction.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=DEFAULT_VAL_FRACTION,
    show_default=True,
    help="Share of validation data.",
)
@click.option(
    "--split",
    type=click.Choice(["auto", *SPLITS]),
    default="auto",
    show_default=True,
    help="Validation split: whole images (source), square blocks of the images (blocks; "
    "chips that would overlap both sides are left out) or single chips (random; with "
    "--stride < --size its validation chips share pixels with training chips); auto = "
    "source with several images, blocks with one.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=None,
    metavar="PX",
    help="Block side for --split blocks [default: 4 × --size, smaller for small images].",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for random chips and the split."
)
@click.option(
    "--ignore-index",
    type=click.IntRange(0, 65535),
    default=None,
    help="Label id for unlabelled pixels [default: classes file's, else 255].",
)
@click.option(
    "--scale",
    type=float,
    default=None,
    help="Factor mapping raw values to ~[0,1] [default: 1/255 uint8, 1/10000 other "
    "integers, 1 float].",
)
@click.option(
    "--sparse",
    is_flag=True,
    help="The labels are sparse points and scribbles: burn vector points and lines with "
    "--buffer, polygons whole, and leave every other pixel unlabelled (ignore index, never "
    "background); skip chips without a labelled pixel.",
)
@click.option(
    "--buffer",
    type=click.FloatRange(min=0),
    default=None,
    metavar="PX",
    help=f"With --sparse: burn pixels within PX pixels of points and lines [default: "
    f"{POINT_BUFFER:g} for points, {LINE_BUFFER:g} for lines; 0 = only the pixels they touch].",
)
@json_opt
@overwrite_opt
def tile(
    images: tuple[str, ...],
    labels: tuple[str, ...],
    outdir: str,
    bidx: tuple[int, ...],
    split: str,
    as_json: bool,
    **options: Any,
) -> None:
    """Cut IMAGE rasters and their labels into georeferenced training chips.

    Writes OUTDIR/images/*.tif and OUTDIR/labels/*.tif (each chip carries its source
    window's transform and CRS), manifest.csv (one row per chip) and stats.json (band
    mean/std, scale, classes, class weights) for `geoseg train`.

    \b
    Labels:
      class-index raster  values 0..N-1 on the image grid (same CRS, size, transform);
                          without --classes, values 0..max become class_0..class_max.
      RGB raster          colours mapped through --classes FILE or --classes isprs.
      vector polygons     GeoJSON (.geojson/.json), or .gpkg/.shp/.fgb/... with the
                          optional pyogrio (pip install 'geoseg[vector]'); rasterised on
                          the image grid (reprojected if their CRS differs; no CRS =
                          image CRS). Pixels no polygon covers are "background":
                          class 0 when classes are inferred, the class named
                          "background" in a classes file (else ignored).
                          Without --classes: numeric classes give background + class_1..,
                          names give background + the sorted names.
    Image nodata pixels become the ignore index in labels.

    \b
    Sparse labels (--sparse), e.g. points and lines digitised in QGIS:
      points    the pixel holding the point + pixels within --buffer px
      lines     the pixels the line touches + pixels within --buffer px
      polygons  their whole interior (no buffer); convert them to lines to
                label only their outline
      Every other pixel is the ignore index; stats.json records sparse: true
      and the labelled share (coverage). Train with --loss partial, or
      complete the labels with `geoseg pseudolabel` first.

    \b
    Examples:
      geoseg tile scene.tif --labels scene_labels.tif -o chips/
      geoseg tile top/*.tif --labels gts/*.tif --classes isprs --size 448 --stride 224 -o chips/
      geoseg tile ortho.tif --labels buildings.geojson --count 500 -o chips/
      geoseg tile ortho.tif --labels landuse.geojson --class-field type -b 1 -b 2 -b 3 -o chips/
      geoseg tile ortho.tif --labels scribbles.gpkg --class-field cls --sparse -o chips/
    """
    split_rule = None if split == "auto" else split
    summary = run_tile(
        list(images), list(labels), outdir, bidx=list(bidx) or None, split=split_rule, **options
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
