"""``geoseg predict``: segment rasters of any size with a trained model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from geoseg_cli.cli.options import (
    bidx_opt,
    creation_options_opt,
    device_opt,
    json_opt,
    overwrite_opt,
)
from geoseg_cli.inference.plan import ENGINES, PROBABILITY_DTYPES, PredictOptions
from geoseg_cli.inference.predict import WindowPredictor
from geoseg_cli.inference.shared import CPU_HEAD_BATCH, GPU_HEAD_BATCH
from geoseg_cli.inference.tta import TTA_SETS


class _OptionalChoice(click.Choice):
    """A choice for an option whose value may be omitted (``--tta`` alone means ``flip``).

    click takes the next word as the value, so ``--tta scene.tif`` would swallow the input;
    the error then says how to write it.
    """

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        self.fail(
            f"{value!r} is not one of {', '.join(self.choices)}; put {param.opts[0]} after the "
            f"inputs or give its value (e.g. {param.opts[0]} {self.choices[0]})",
            param,
            ctx,
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    default=None,
    help="Output GeoTIFF (one input) or existing folder (several inputs). "
    "[default: <stem>_pred.tif in the current folder]",
)
@click.option(
    "-m",
    "--model",
    required=True,
    help="Checkpoint (.pt from geoseg train) or ONNX model (.onnx from geoseg export).",
)
@click.option(
    "--tta",
    type=_OptionalChoice(TTA_SETS),
    is_flag=False,
    flag_value="flip",
    default=None,
    help="Test-time augmentation: --tta = identity + horizontal + vertical flip (the "
    "paper's), --tta d4 = the 8 dihedral views. [default: off]",
)
@click.option(
    "--window",
    type=click.IntRange(min=16),
    default=None,
    help="Window size T in pixels, a multiple of 16. [default: the model's training window]",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=None,
    help="Step between windows (overlap = T - stride). [default: T/2]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images (windows x TTA views) per forward pass; with the shared engine, per head "
    "pass (whole windows). Results do not depend on it. "
    f"[default: a row band's images in passes of <= {WindowPredictor.DEFAULT_BATCH} on a "
    f"CPU, {WindowPredictor.GPU_BATCH} on a GPU; shared engine: {CPU_HEAD_BATCH} on a CPU, "
    f"{GPU_HEAD_BATCH} on a GPU]",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=PredictOptions.engine,
    show_default=True,
    help="window: the whole network on every window (the paper's method, exact strides). "
    "shared: the backbone runs once per pixel and view, only the SCG head per window (much "
    "faster with overlap; stride rounded to the feature grid; falls back to window when "
    "the model cannot split or windows do not overlap; classes may differ from window's "
    "where the backbone's context at window borders differs).",
)
@device_opt
@bidx_opt
@click.option(
    "--nodata",
    type=float,
    default=None,
    help="Input nodata value, overriding the raster's (pixels equal to it in every band "
    "are not predicted). [default: the raster's mask/nodata]",
)
@click.option(
    "--bounds",
    type=float,
    nargs=4,
    default=None,
    metavar="LEFT BOTTOM RIGHT TOP",
    help="Predict only this part of the raster (in its CRS).",
)
@click.option(
    "--probabilities",
    is_flag=True,
    help="Also write per-class probabilities to <output stem>_probabilities.tif.",
)
@click.option(
    "--probability-dtype",
    type=click.Choice(PROBABILITY_DTYPES),
    default=PROBABILITY_DTYPES[0],
    show_default=True,
    help="Probability encoding: uint8 is round(255 * p), float32 is p.",
)
@click.option(
    "--cog",
    is_flag=True,
    help="Write Cloud-Optimized GeoTIFFs with overviews (GDAL's COG driver; --co options "
    "then apply to it).",
)
@click.option(
    "--vector",
    default=None,
    help="Also write class polygons: a .geojson file, .gpkg/.fgb with pip install "
    "'geoseg[vector]', or a folder for several inputs (GeoJSON files).",
)
@creation_options_opt
@overwrite_opt
@json_opt
def predict(
    inputs: tuple[str, ...],
    output: str | None,
    model: str,
    device: str,
    bidx: tuple[int, ...],
    probabilities: bool,
    probability_dtype: str,
    vector: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Segment rasters with a trained model; print the paths written.

    With --json, one JSON object per input, a line each, as each finishes. Windows of size
    T slide with the given stride; softmax probabilities are blended with a smooth weight
    window, so there are no seams. Memory does not grow with the raster height. Nodata
    pixels stay nodata (255) in the uint8 class map, which keeps the input's CRS, transform
    and size and carries a colour table. Under torchrun, each rank predicts its share of the
    inputs. The window engine runs the whole network on every window, as the paper does;
    --engine shared computes the backbone once per pixel and shares it between overlapping
    windows.

    \b
    Examples:
      geoseg predict scene.tif --model run/best.pt --tta
      geoseg predict scene.tif -m run/best.pt --window 448 --stride 100 --tta  # the paper
      geoseg predict scene.tif -m run/best.pt --window 448 --stride 112 --tta --engine shared
      geoseg predict tiles/*.tif -o out/ -m model.onnx --cog --vector polygons/
      geoseg predict scene.tif -m best.pt -o pred.tif --probabilities --co COMPRESS=LZW
    """
    from geoseg_cli.distributed import torchrun_env
    from geoseg_cli.inference import load_runtime, predict_rasters
    from geoseg_cli.inference.outputs import output_paths, vector_paths

    env = torchrun_env()
    outputs = output_paths(inputs, output)
    vectors = vector_paths(vector, outputs)
    inputs, outputs, vectors = (env.shard(x) for x in (inputs, outputs, vectors))
    if not inputs:
        return
    runtime = load_runtime(model, device)
    settings = PredictOptions(
        bands=bidx or None,
        probabilities=probability_dtype if probabilities else None,
        **options,
    )
    results = predict_rasters(runtime, inputs, outputs, vectors, settings)
    for source, result in zip(inputs, results, strict=True):
        if as_json:
            fields = dataclasses.asdict(result)
            record = {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}
            click.echo(json.dumps({"input": source, **record}))
            continue
        for path in (result.output, result.probabilities, result.vector):
            if path is not None:
                click.echo(path)
