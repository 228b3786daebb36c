"""NaN and ±inf pixels: nodata in predict, tile, train and evaluate; never fed to a network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner

from geoseg_cli.chips import load_training_chips
from geoseg_cli.cli import cli
from geoseg_cli.data import ChipDataset
from geoseg_cli.export.onnx import export_onnx
from geoseg_cli.tiling import tile
from tests.conftest import TINY_TRAIN, coarse_scene, save_tiny_checkpoint, write_raster

torch.set_num_threads(2)


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def float_models(tmp_path_factory) -> dict[str, Path]:
    """An untrained float32 model (scale 1e-4, mean 0.45) as a checkpoint and as ONNX."""
    folder = tmp_path_factory.mktemp("float_model")
    checkpoint = save_tiny_checkpoint(folder / "f.pt", dtype="float32", seed=3)
    return {"pt": checkpoint, "onnx": export_onnx(checkpoint, folder / "f.onnx").path}


def holes_and_filled() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A float32 scene with NaN/±inf holes; the same with the holes at the band means."""
    image = (np.random.default_rng(0).random((3, 70, 90)) * 9000).astype(np.float32)
    image[:, 20:30, 30:45] = np.nan
    image[1, 50, 60] = np.inf  # one band not finite: the pixel is nodata too
    image[0, 5, 80] = -np.inf
    holes = ~np.isfinite(image).all(axis=0)
    filled = np.where(np.isfinite(image), image, np.float32(0.45 * 10000))
    return image, filled, holes


@pytest.mark.parametrize("engine", ["window", "shared"])
@pytest.mark.parametrize("model", ["pt", "onnx"])
def test_nan_pixels_are_nodata_and_do_not_spread(float_models, tmp_path, model, engine):
    image, filled, holes = holes_and_filled()
    maps, probabilities = {}, {}
    for name, array in (("holes", image), ("filled", filled)):
        source = write_raster(tmp_path / f"{name}.tif", array)
        out = tmp_path / f"{name}_pred.tif"
        result = run(
            "-q",
            "predict",
            source,
            "-m",
            float_models[model],
            "-o",
            out,
            "--engine",
            engine,
            "--probabilities",
            "--probability-dtype",
            "float32",
        )
        assert result.exit_code == 0, result.output
        maps[name] = read(out)[0]
        probabilities[name] = read(tmp_path / f"{name}_pred_probabilities.tif")
    assert holes.sum() == 152
    assert (maps["holes"][holes] == 255).all() and (maps["filled"] != 255).all()
    # a hole is the band's training mean, 0 once standardized: the rest is as if it were filled
    np.testing.assert_array_equal(maps["holes"][~holes], maps["filled"][~holes])
    assert np.isfinite(probabilities["holes"]).all()
    assert (probabilities["holes"][:, holes] == 0).all()
    np.testing.assert_allclose(
        probabilities["holes"][:, ~holes], probabilities["filled"][:, ~holes], atol=1e-6
    )
    assert len(np.unique(maps["holes"][~holes])) > 1  # not one class everywhere


@pytest.mark.parametrize("engine", ["window", "shared"])
def test_values_the_network_turns_into_nan_are_an_error(float_models, tmp_path, engine):
    image = (np.random.default_rng(1).random((3, 50, 60)) * 9000).astype(np.float32)
    image[:, 40, 45] = 3e38  # finite, but far past what float32 standardization can hold
    source = write_raster(tmp_path / "fill_value.tif", image)
    out = tmp_path / "pred.tif"
    result = run("predict", source, "-m", float_models["pt"], "-o", out, "--engine", engine)
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"Error: {source}: the model returned NaN/inf probabilities")
    assert "--nodata VALUE" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fill_value.tif"]


@pytest.fixture
def nan_chips(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A float32 scene in [0, 1] with a NaN block and a NaN pixel, tiled into 32-px chips."""
    image, labels = coarse_scene(96, 128, seed=5)
    image = image.astype(np.float32) / 255
    image[:, 40:56, 8:40] = np.nan
    image[2, 70, 100] = np.nan
    source = write_raster(tmp_path / "scene.tif", image)
    label_path = write_raster(tmp_path / "labels.tif", labels)
    tile([str(source)], [str(label_path)], tmp_path / "chips", size=32, val_fraction=0.25, seed=0)
    return tmp_path / "chips", image, labels


def test_tile_marks_nan_as_nodata_and_training_never_sees_it(nan_chips):
    chips, image, labels = nan_chips
    stats, train_records, val_records = load_training_chips(chips)
    records = train_records + val_records
    finite = np.isfinite(image).all(axis=0)
    by_id = {r.chip_id: r for r in records}
    block = by_id["scene_00032_00000"]  # rows 32..64, cols 0..32: the NaN block's corner
    assert block.nodata_fraction == pytest.approx(16 * 24 / 32**2)
    with rasterio.open(block.label(chips)) as src:
        chip_labels = src.read(1)
    assert (chip_labels[8:24, 8:] == 255).all() and (chip_labels[:8] != 255).all()
    # band statistics of the train chips' finite pixels only
    train = np.zeros(finite.shape, bool)
    for r in train_records:
        train[r.row_off : r.row_off + r.height, r.col_off : r.col_off + r.width] = True
    pixels = image[:, train & finite].astype(np.float64)
    np.testing.assert_allclose(stats.input.mean, pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats.input.std, pixels.std(axis=1), rtol=1e-6)

    dataset = ChipDataset(chips, records, stats, 32)
    for index, record in enumerate(records):
        x, y = dataset[index]
        window = np.s_[record.row_off : record.row_off + 32, record.col_off : record.col_off + 32]
        raw = image[(slice(None), *window)]
        assert torch.isfinite(x).all(), record.chip_id
        np.testing.assert_array_equal(x.numpy()[~np.isfinite(raw)], 0)  # mean, standardized
        np.testing.assert_array_equal(y.numpy() == 255, ~finite[window])
        np.testing.assert_array_equal(y.numpy()[finite[window]], labels[window][finite[window]])


def test_training_on_nan_chips_keeps_a_finite_loss(nan_chips, tmp_path):
    chips, _, _ = nan_chips
    run_dir = tmp_path / "run"
    result = run(
        "-q", "train", chips, "-o", run_dir, *TINY_TRAIN, "--epochs", "1", "--batch-size", "4"
    )
    assert result.exit_code == 0, result.output
    with open(run_dir / "metrics.csv") as f:
        row = f.read().splitlines()[1].split(",")
    assert np.isfinite([float(v) for v in row]).all()


def test_chip_values_that_standardize_to_inf_are_named(nan_chips, tmp_path):
    chips, _, _ = nan_chips
    _, train_records, _ = load_training_chips(chips)
    bad = train_records[3]
    with rasterio.open(bad.image(chips), "r+") as dst:
        data = dst.read()
        data[:, 5, 5] = 3e38  # a fill value nobody declared as nodata
        dst.write(data)
    run_dir = tmp_path / "run"
    result = run("train", chips, "-o", run_dir, *TINY_TRAIN, "--epochs", "1", "--batch-size", "4")
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert f"chip(s) {bad.chip_id} hold values that are not finite once standardized" in message
    assert "learning" not in message and "--lr" not in message
    assert message.endswith("no epoch had finished: nothing was kept")
    assert not run_dir.exists()  # no config.toml, no empty folder


def test_evaluate_does_not_score_nan_labels(make_raster, tmp_path):
    rng = np.random.default_rng(2)
    pred = rng.integers(0, 3, (40, 50)).astype(np.uint8)
    labels = pred.astype(np.float32)
    labels[10:20] = (labels[10:20] + 1) % 3  # 500 wrong pixels
    labels[:10] = np.nan  # 500 unlabelled pixels
    labels[30, :5] = np.inf
    pred_path, label_path = make_raster("pred.tif", pred), make_raster("labels.tif", labels)
    classes = tmp_path / "classes.json"  # maps the label values as tile does
    classes.write_text(
        json.dumps({"classes": [{"name": n, "color": [i, i, i]} for i, n in enumerate("abc")]})
    )
    for extra in ([], ["--classes", classes]):
        result = run("evaluate", pred_path, label_path, "--json", *extra)
        assert result.exit_code == 0, result.output
        metrics = json.loads(result.stdout)
        assert metrics["pixels"] == 2000 - 505
        assert metrics["oa"] == pytest.approx((2000 - 505 - 500) / (2000 - 505))
    labels[25, 7] = 1.5
    result = run("evaluate", pred_path, make_raster("fractions.tif", labels))
    assert result.exit_code == 1 and "class ids must be whole numbers" in result.output
