"""``geoseg pseudolabel``: complete sparse label chips by graph propagation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from geoseg_cli.cli.options import device_opt, json_opt, overwrite_opt
from geoseg_cli.pseudolabel import PseudolabelConfig
from geoseg_cli.pseudolabel import pseudolabel as run_pseudolabel
from models.wsgcn import PropagationConfig


@click.command()
@click.argument("chips_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "outdir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output chips folder (new).",
)
@click.option(
    "--confidence",
    type=click.FloatRange(0, 1),
    default=PseudolabelConfig.confidence,
    show_default=True,
    help="Pixels whose top class probability is lower stay unlabelled (ignore index).",
)
@click.option(
    "--model",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint (e.g. run/best.pt) whose backbone adds features to the graph nodes.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=PropagationConfig.steps,
    show_default=True,
    help="Adam steps of each chip's GCN.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=PseudolabelConfig.batch_size,
    show_default=True,
    help="Chips propagated together (one block-diagonal graph; larger is faster on a GPU).",
)
@device_opt
@click.option(
    "--seed", type=int, default=PseudolabelConfig.seed, show_default=True, help="Random seed."
)
@json_opt
@overwrite_opt
def pseudolabel(
    chips_dir: Path,
    outdir: Path,
    confidence: float,
    model: Path | None,
    steps: int,
    batch_size: int,
    device: str,
    seed: int,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Complete the sparse labels of CHIPS_DIR (geoseg tile --sparse) into OUTDIR.

    Each chip becomes a graph of small pixel cells (8 neighbours plus the top-k colour,
    position and, with --model, backbone-feature affinities), and a 2-layer GCN trained on
    the chip's labelled pixels (cross-entropy, entropy and Laplacian smoothness terms, after
    WSGCN) labels the rest. Every labelled pixel keeps its label; pixels below --confidence
    and nodata stay unlabelled. OUTDIR is an ordinary chips folder for geoseg train; chips
    without a labelled pixel are left out and counted.

    \b
    Examples:
      geoseg pseudolabel chips/ -o chips_dense/
      geoseg pseudolabel chips/ -o chips_dense/ --confidence 0.9 --model run/best.pt
      geoseg train chips_dense/ -o run/
    """
    config = PseudolabelConfig(
        confidence=confidence,
        model=model,
        device=device,
        batch_size=batch_size,
        seed=seed,
        propagation=dataclasses.replace(PropagationConfig(), steps=steps),
    )
    summary = run_pseudolabel(chips_dir, outdir, config, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
