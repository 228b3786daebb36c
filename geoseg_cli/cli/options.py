"""Options shared by several commands, spelled as rasterio's ``rio`` spells them."""

from __future__ import annotations

import click

overwrite_opt = click.option(
    "--overwrite", is_flag=True, help="Replace existing output instead of refusing."
)
json_opt = click.option(
    "--json", "as_json", is_flag=True, help="Print a machine-readable JSON result on stdout."
)
bidx_opt = click.option(
    "-b",
    "--bidx",
    type=click.IntRange(min=1),
    multiple=True,
    help=(
        "1-based band index to read (repeatable; default: every band but alpha bands, "
        "which mask the others / the model's bands)"
    ),
)
class_field_opt = click.option(
    "--class-field",
    default=None,
    metavar="NAME",
    help="Vector attribute with each polygon's class (number or class name).",
)
class_value_opt = click.option(
    "--class-value",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Burn every polygon as class value N [default: 1 without --class-field].",
)
device_opt = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where PyTorch runs: auto picks CUDA when available.",
)


def _parse_creation_options(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE (e.g. --co COMPRESS=LZW)")
        options[key.upper()] = value
    return options


creation_options_opt = click.option(
    "--co",
    "creation_options",
    multiple=True,
    metavar="NAME=VALUE",
    callback=_parse_creation_options,
    help="GDAL creation option for the output GeoTIFF (repeatable), e.g. --co COMPRESS=LZW.",
)
