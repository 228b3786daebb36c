"""``geoseg demo`` at a tiny size: every promised output exists, opens and is georeferenced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
from click.testing import CliRunner

from geoseg_cli.checkpoint import load_checkpoint
from geoseg_cli.cli import cli
from geoseg_cli.demo import DEMO_CLASSES, DEMO_CRS, IGNORE_INDEX, make_scene, scene_transform
from geoseg_cli.train_config import read_config_file


def test_scene_is_reproducible_and_has_every_class() -> None:
    image, labels = make_scene(256, seed=3)
    again, _ = make_scene(256, seed=3)
    assert np.array_equal(image, again)
    assert image.shape == (3, 256, 256) and image.dtype == np.uint8
    present = set(np.unique(labels).tolist())
    assert set(range(len(DEMO_CLASSES))) | {IGNORE_INDEX} == present
    # The nodata corner is 0 in every band of the image and ignored in the labels.
    assert np.all(image[:, 0, 0] == 0) and labels[0, 0] == IGNORE_INDEX
    assert np.all(image[:, labels != IGNORE_INDEX] > 0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_demo_writes_every_promised_file(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        cli,
        ["-q", "demo", str(out), "--size", "128", "--window", "32", "--epochs", "1", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # warnings go to stderr
    assert summary == json.loads((out / "summary.json").read_text())
    for name in ("checkpoint", "prediction", "onnx", "onnx_prediction", "metrics", "quicklook"):
        assert Path(summary["outputs"][name]).is_file(), name
    assert 0.0 <= summary["held_out"]["miou"] <= 1.0
    assert summary["onnx_vs_pytorch_agreement"] > 0.99

    with rasterio.open(out / "data" / "scene_heldout.tif") as src:
        expected = (src.crs, src.transform, src.shape)
        assert src.crs == DEMO_CRS and src.transform == scene_transform(128, 2)
    for name in ("prediction", "onnx_prediction"):
        with rasterio.open(summary["outputs"][name]) as pred:
            assert (pred.crs, pred.transform, pred.shape) == expected
            assert pred.nodata == 255 and pred.colormap(1)[1][:3] == DEMO_CLASSES[1].color
            assert pred.read(1)[0, 0] == 255  # the nodata corner stays nodata
    with rasterio.open(
        out / "chips" / "images" / next(p.name for p in (out / "chips" / "images").iterdir())
    ) as chip:
        assert chip.crs == DEMO_CRS
    assert [c.name for c in load_checkpoint(summary["outputs"]["checkpoint"]).classes] == [
        c.name for c in DEMO_CLASSES
    ]

    # the run's config.toml names the demo's folders, not its temporary ones: it resumes
    assert read_config_file(out / "run" / "config.toml")["chips_dir"] == str(
        (out / "chips").absolute()
    )
    resumed = CliRunner().invoke(
        cli, ["-q", "train", "--resume", str(out / "run"), "--epochs", "2"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(out / "run" / "last.pt").training["epoch"] == 2

    # info describes the backbone graph export wrote beside the model as a part of it
    backbone = Path(summary["outputs"]["onnx"]).with_suffix(".backbone.onnx")
    shown = CliRunner().invoke(cli, ["info", str(backbone)])
    assert shown.exit_code == 0, shown.output
    assert f"the backbone graph of {Path(summary['outputs']['onnx']).name}" in shown.output
    props = {p.key for p in onnx.load(summary["outputs"]["onnx"]).metadata_props}
    assert {"geoseg", "model_type", "class_names"} <= props
    with open(summary["outputs"]["quicklook"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "metrics.json").read_text())) >= {"miou", "oa"}
