"""What a training run keeps on disk for ``--resume``: its files, metrics history, curves, RNG."""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg_cli.errors import CheckpointError, OutputError
from geoseg_cli.raster import atomic_output

log = logging.getLogger(__name__)

#: Files of a run folder.
RUN_FILES = ("config.toml", "metrics.csv", "best.pt", "last.pt", "curves.png")


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch, numpy, python (and CUDA) random states as plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore the random states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Write the per-epoch rows of ``metrics.csv`` (atomically)."""
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        for row in history:
            writer.writerow({k: v if isinstance(v, int) else repr(v) for k, v in row.items()})


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``RUN_DIR/metrics.csv`` (none without the file)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: int(v) if k in ("epoch", "step") else float(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def plot_history(path: Path, history: list[dict[str, float]]) -> None:
    """Loss and score curves; a log note when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        if len(history) == 1:
            log.info("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    losses, scores = fig.subplots(1, 2)
    curves = {"train_loss": "train (with the model's terms)", "val_loss": "val (segmentation)"}
    for key, label in curves.items():
        losses.plot(epochs, [row[key] for row in history], marker="o", label=label)
    for key in ("oa", "mf1", "miou"):
        scores.plot(epochs, [row[key] for row in history], marker="o", label=key)
    losses.set(xlabel="epoch", ylabel="loss", title="loss")
    scores.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
    for ax in (losses, scores):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that cannot hold this run (every rank checks).

    Raises:
        CheckpointError: ``resume`` without a ``last.pt``.
        OutputError: A new run over an existing one without ``overwrite``.
    """
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise CheckpointError(f"{run_dir}: no last.pt to resume from; start a new run")
        return
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume "
            f"{run_dir} to continue it or --overwrite to start over"
        )


def make_run_dir(run_dir: Path, resume: bool) -> bool:
    """Create the run folder (rank 0), clearing the files of an overwritten run.

    Returns:
        Whether the folder was created.

    Raises:
        OutputError: The path is a file.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{run_dir} is a file; give a folder for the run")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    return created


def non_finite_message(run_dir: Path, epoch: int, step: int, value: float, chips: list[str]) -> str:
    """Why a run stopped on a loss that is not finite, and what was kept.

    Args:
        run_dir: The run folder.
        epoch: The epoch (0-based) that was training.
        step: Optimizer steps done.
        value: The loss.
        chips: The chips of the batch whose standardized input is not finite.
    """
    if chips:
        shown = ", ".join(chips[:5]) + (f" and {len(chips) - 5} more" if len(chips) > 5 else "")
        cause = (
            f"chip(s) {shown} hold values that are not finite once standardized with "
            "stats.json's mean and std (a fill value such as -3.4e38 not marked nodata?): "
            "mark them nodata in the source raster (gdal_edit -a_nodata VALUE) and run "
            "geoseg tile again"
        )
    else:
        cause = "lower the LR (--lr), or try --loss ce or --no-amp"
    return (
        f"training stopped: the loss became {value} at epoch {epoch + 1}, step {step + 1}; "
        f"{cause}; {kept_note(run_dir, epoch)}"
    )


def discard_unfinished(run_dir: Path) -> None:
    """Remove a new run folder whose first epoch never reached ``last.pt``."""
    if (run_dir / "last.pt").is_file():
        return
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def kept_note(run_dir: Path, epoch: int) -> str:
    """What a stopped run leaves: ``last.pt`` after ``epoch`` epochs to resume from, or nothing."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return "no epoch had finished: nothing was kept"
    return f"{last} (epoch {epoch}) is kept: continue from it with --resume {run_dir}"
