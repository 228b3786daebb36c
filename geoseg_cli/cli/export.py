"""``geoseg export``: turn a checkpoint into a model file other tools can run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from geoseg_cli.cli.options import json_opt, overwrite_opt
from geoseg_cli.errors import UsageError
from geoseg_cli.export.metadata import DEFAULT_OPSET, FP32_TOLERANCE


@click.group()
def export() -> None:
    """Export a trained checkpoint to another format.

    \b
    Example:
      geoseg export onnx run/best.pt -o model.onnx
    """


@export.command("onnx")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="ONNX file to write (default: CHECKPOINT with .onnx, _fp16.onnx or _int8.onnx).",
)
@click.option(
    "--opset",
    type=click.IntRange(min=DEFAULT_OPSET),
    default=DEFAULT_OPSET,
    show_default=True,
    help=f"ONNX opset ({DEFAULT_OPSET} runs in the onnxruntime bundled with QGIS).",
)
@click.option(
    "--dynamic-size",
    is_flag=True,
    help="Dynamic height/width (GeoDeep and QGIS Deepness need the default fixed window).",
)
@click.option("--fp16", is_flag=True, help="Half-precision weights, for GPU inference.")
@click.option(
    "--int8",
    is_flag=True,
    help="int8 quantization for CPU inference: static with --calibrate (faster), dynamic "
    "without; check the class agreement it reports.",
)
@click.option(
    "--calibrate",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="With --int8: static int8 calibrated on the train chips of this geoseg tile "
    "folder (per-channel int8 convolutions; the head stays float).",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=None,
    help="Recommended stride in pixels written to the metadata (default: half the window); "
    "sets tiles_overlap for GeoDeep/Deepness.",
)
@click.option(
    "--resolution",
    type=float,
    default=None,
    help="Ground resolution in cm/px for GeoDeep/Deepness (default: from the checkpoint).",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=FP32_TOLERANCE,
    show_default=True,
    help="Largest accepted fp32 probability difference to PyTorch in the parity check.",
)
@click.option(
    "--split/--no-split",
    default=True,
    show_default=True,
    help="Also write <output stem>.backbone.onnx and .head.onnx beside the model, which "
    "geoseg predict --engine shared needs; model.onnx is the same either way.",
)
@overwrite_opt
@json_opt
def onnx(
    checkpoint: Path,
    output: Path | None,
    fp16: bool,
    int8: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Export CHECKPOINT to ONNX with its metadata, then check parity with PyTorch.

    The graph takes `image` (float32, N×C×T×T, band values scaled to [0, 1]) and returns
    `probabilities` (N×K×T×T); standardization and softmax are inside. The file runs in
    geoseg predict, GeoDeep and QGIS Deepness. Beside it go the backbone and head graphs
    of geoseg predict's shared engine (MODEL.backbone.onnx, MODEL.head.onnx; keep them
    next to MODEL.onnx, or predict falls back to the slower window engine).

    \b
    Examples:
      geoseg export onnx run/best.pt -o model.onnx
      geoseg export onnx run/best.pt --int8 --calibrate chips/ -o model_int8.onnx
      geodeep scene.tif model.onnx -t mask
    """
    from geoseg_cli.export.onnx import export_onnx

    if fp16 and int8:
        raise UsageError("--fp16 and --int8 exclude each other; pick one")
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    if output is None:
        suffix = ".onnx" if precision == "fp32" else f"_{precision}.onnx"
        output = checkpoint.with_name(checkpoint.stem + suffix)
    result = export_onnx(checkpoint, output, precision=precision, **options)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(
        f"wrote {result.path} ({result.precision}, opset {result.opset}, "
        f"{result.size_bytes / 1e6:.1f} MB); parity with PyTorch: "
        f"max abs diff {result.max_abs_diff:.3g}, "
        f"classes agree on {100 * result.class_agreement:.2f}% of pixels"
    )
    if result.backbone is not None:
        click.echo(
            f"wrote {result.backbone} and {result.head} (shared engine); parity with PyTorch: "
            f"max abs diff {result.split_max_abs_diff:.3g}"
        )
