"""The checkpoint contract: plain containers, weights_only loading, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from geoseg_cli.checkpoint import (
    Checkpoint,
    ClassInfo,
    InputSpec,
    ModelInfo,
    ModelSpec,
    load_checkpoint,
    save_checkpoint,
)
from geoseg_cli.errors import CheckpointError


def _checkpoint(**overrides) -> Checkpoint:
    fields = {
        "model": ModelSpec("scg-gcn", "resnet18", 2, 3),
        "classes": [ClassInfo("background", (0, 0, 0)), ClassInfo("building", (255, 0, 0))],
        "ignore_index": 255,
        "input": InputSpec([1, 2, 3], "uint8", 1 / 255, [0.4, 0.4, 0.4], [0.2, 0.2, 0.2], 0),
        "window": 64,
        "state_dict": {"w": torch.arange(6.0)},
        "training": {"epoch": 3, "step": 120, "best_metric": 0.5, "rng": {"torch": torch.ones(2)}},
    }
    fields.update(overrides)
    return Checkpoint(**fields)


def test_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(_checkpoint(), path)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 1 and raw["epoch"] == 3
    loaded = load_checkpoint(path)
    assert loaded.classes[1] == ClassInfo("building", (255, 0, 0))
    assert loaded.input.bands == [1, 2, 3] and loaded.input.scale == pytest.approx(1 / 255)
    assert torch.equal(loaded.state_dict["w"], torch.arange(6.0))
    assert loaded.training["step"] == 120
    assert isinstance(loaded.info, ModelInfo) and not hasattr(loaded.info, "state_dict")
    assert "state_dict" not in loaded.describe() and "rng" not in loaded.describe()


def test_foreign_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a geoseg model"):
        load_checkpoint(foreign)

    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"broken\.pt: not a PyTorch checkpoint file"):
        load_checkpoint(corrupt)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"run is a folder.*best\.pt and last\.pt"):
        load_checkpoint(run)
    (run / "best.pt").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"run is a folder; give a checkpoint file, e\.g\. .*best\.pt"
    ):
        load_checkpoint(run)


def test_inconsistent_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    save_checkpoint(_checkpoint(classes=[ClassInfo("only", (1, 2, 3))]), path)
    with pytest.raises(CheckpointError, match="1 class names for a 2-class model"):
        load_checkpoint(path)

    save_checkpoint(
        _checkpoint(input=InputSpec([1, 2], "uint8", 1 / 255, [0.5, 0.5], [0.2, 0.2])), path
    )
    with pytest.raises(CheckpointError, match="3 channels"):
        load_checkpoint(path)


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"format_version": 1, "payload": ClassInfo("a", (1, 2, 3))}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)
