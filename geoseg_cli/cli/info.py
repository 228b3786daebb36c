"""``geoseg info``: print the contract embedded in a checkpoint or an exported ONNX model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from geoseg_cli.cli.options import json_opt


def describe_model_file(path: Path) -> dict[str, Any]:
    """The description of a ``.onnx`` model or a ``.pt`` checkpoint (training state included)."""
    if path.suffix.lower() == ".onnx":
        from geoseg_cli.inference.onnx_runtime import describe_onnx

        return describe_onnx(path)
    from geoseg_cli.checkpoint import file_hash, load_checkpoint

    ckpt = load_checkpoint(path)
    description = ckpt.describe()
    training = ckpt.training or {}
    description["training"] = {key: training.get(key) for key in ("epoch", "step", "best_metric")}
    description["file"] = {"size_bytes": path.stat().st_size, "sha256": file_hash(path)}
    return description


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars in training state become plain numbers."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def format_description(path: Path, d: dict[str, Any]) -> str:
    """Human-readable summary of :func:`describe_model_file`'s result."""
    if "part" in d:
        part = (
            f"part        the {d['part']} graph of {d['part_of']} (geoseg predict -m "
            f"{d['part_of']} runs it; on its own it has no classes or input scaling)"
        )
        return "\n".join([f"model       {path}", part, *_onnx_lines(d)])
    model, inp = d["model"], d["input"]
    lines = [
        f"model       {path}",
        f"variant     {model['variant']} (backbone {model['backbone']}"
        + (f", options {model['options']})" if model["options"] else ")"),
        f"input       {model['in_channels']} bands {inp['bands']}, {inp['dtype']} "
        f"× {inp['scale']:.6g}, mean {_floats(inp['mean'])}, std {_floats(inp['std'])}",
        f"            nodata {inp['nodata']}, resolution "
        + (f"{inp['resolution']:g} m" if inp["resolution"] else "unknown"),
        f"window      {d['window']} px",
        f"classes     {model['num_classes']} (ignore index {d['ignore_index']})",
    ]
    lines += [
        f"  {i:>3}  {c['name']:<20} #{''.join(f'{v:02x}' for v in c['color'])}"
        for i, c in enumerate(d["classes"])
    ]
    if "training" in d:
        t = d["training"]
        best = t["best_metric"]
        best = f"{best:.4g}" if isinstance(best, float) else best
        lines.append(f"training    epoch {t['epoch']}, step {t['step']}, best metric {best}")
    if "onnx" in d:
        lines += _onnx_lines(d)
    lines.append(f"format      {d['format_version']} (geoseg {d['geoseg_version']})")
    return "\n".join(lines)


def _onnx_lines(d: dict[str, Any]) -> list[str]:
    """The graph (opset, inputs → outputs, size) and export details of an ONNX model."""
    o = d["onnx"]
    graph = " → ".join(
        ", ".join(f"{v['name']} {v['dtype']} {v['shape']}" for v in o[key])
        for key in ("inputs", "outputs")
    )
    size = f"{o['size_bytes'] / 1e6:.1f} MB"
    if "part" in d:
        return [f"onnx        opset {o['opset']}, {graph}, {size}"]
    return [
        f"onnx        opset {o['opset']}, {d.get('precision', 'fp32')}, {graph}",
        f"            recommended stride {d.get('recommended_stride')}, "
        f"resolution {d.get('resolution_cm')} cm/px, {size}",
    ]


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@json_opt
def info(model: Path, as_json: bool) -> None:
    """Show what MODEL (a .pt checkpoint or an exported .onnx) expects and predicts.

    Classes and colours, input bands, scaling and standardization, window, the training
    progress of a checkpoint, and the opset, inputs and outputs of an ONNX model.

    \b
    Examples:
      geoseg info run/best.pt
      geoseg info model.onnx --json
    """
    description = describe_model_file(model)
    if as_json:
        click.echo(json.dumps(description, indent=2, default=_jsonable))
    else:
        click.echo(format_description(model, description))
