"""geoseg predict refusals: band counts, dtypes, bad checkpoints and options, nodata, interrupts."""

from __future__ import annotations

import signal
import sys

import numpy as np
import pytest
import torch
from test_predict import StandIn, pixelwise, read, run

from geoseg_cli.errors import InputError
from geoseg_cli.inference import PredictOptions, predict_raster
from tests.conftest import save_tiny_checkpoint

torch.set_num_threads(2)


def test_band_count_and_dtype_mismatch(make_raster, tiny_checkpoint, tmp_path):
    gray = make_raster("gray.tif", np.ones((1, 40, 40), dtype=np.uint8))
    result = run(["predict", str(gray), "-m", str(tiny_checkpoint), "-o", str(tmp_path / "g.tif")])
    assert result.exit_code == 1
    assert "gray.tif has 1 band(s) but the model reads band(s) [1, 2, 3]" in result.output
    result = run(["predict", str(gray), "-m", str(tiny_checkpoint), "-b", "1"])
    assert result.exit_code == 2 and "-b gave 1 band(s) but the model takes 3" in result.output
    wide = make_raster("wide.tif", np.ones((3, 40, 40), dtype=np.uint16))
    result = run(["predict", str(wide), "-m", str(tiny_checkpoint), "-o", str(tmp_path / "w.tif")])
    assert result.exit_code == 1
    assert "wide.tif has uint16 bands but the model was trained on uint8" in result.output
    assert not (tmp_path / "g.tif").exists() and not (tmp_path / "w.tif").exists()
    # several inputs: one that does not fit stops the run before the first is predicted
    fine = make_raster("fine.tif", np.ones((3, 40, 40), dtype=np.uint8))
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = run(["predict", str(fine), str(wide), "-m", str(tiny_checkpoint), "-o", f"{outdir}/"])
    assert result.exit_code == 1 and "wide.tif has uint16 bands" in result.output
    assert list(outdir.iterdir()) == []


def test_uint16_single_band_model_with_band_selection(make_raster, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "pan.pt", in_channels=1, dtype="uint16")
    image = np.random.default_rng(4).integers(0, 4000, (2, 40, 50), dtype=np.uint16)
    source = make_raster("pan.tif", image)
    out = tmp_path / "pan_pred.tif"
    result = run(["-q", "predict", str(source), "-m", str(ckpt), "-b", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert read(out)[0].shape == (1, 40, 50) and read(out)[0].max() < 3


def test_corrupt_checkpoint_existing_output_and_bad_options(scene, tiny_checkpoint, tmp_path,
                                                            monkeypatch):  # fmt: skip
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    image = str(scene["image"])
    result = run(["predict", image, "-m", str(bad), "-o", str(tmp_path / "x.tif")])
    assert result.exit_code == 1 and "bad.pt: not a PyTorch checkpoint file" in result.output
    existing = tmp_path / "exists.tif"
    existing.write_bytes(b"keep me")
    result = run(["predict", image, "-m", str(tiny_checkpoint), "-o", str(existing)])
    assert result.exit_code == 1 and "pass --overwrite" in result.output
    assert existing.read_bytes() == b"keep me"
    before = scene["image"].read_bytes()
    result = run(["predict", image, "-m", str(tiny_checkpoint), "-o", image, "--overwrite"])
    assert result.exit_code == 2 and "scene.tif is an input raster; write the" in result.output
    assert scene["image"].read_bytes() == before
    out = ["-o", str(tmp_path / "x.tif")]
    result = run(["predict", "--tta", image, "-m", str(tiny_checkpoint), *out])
    assert result.exit_code == 2 and "put --tta after the inputs" in result.output
    result = run(["predict", image, "-m", str(tiny_checkpoint), "--window", "40", *out])
    assert result.exit_code == 2 and "multiple of 16" in result.output
    vector = str(tmp_path / "x.csv")
    result = run(["predict", image, "-m", str(tiny_checkpoint), "--vector", vector, *out])
    assert result.exit_code == 2 and "unknown vector format '.csv'" in result.output
    monkeypatch.setitem(sys.modules, "pyogrio", None)  # not installed: refused before running
    vector = str(tmp_path / "x.gpkg")
    result = run(["predict", image, "-m", str(tiny_checkpoint), "--vector", vector, *out])
    assert result.exit_code == 2 and "pip install 'geoseg[vector]'" in result.output
    result = run(["predict", image, "-m", str(tiny_checkpoint), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "x.png: predictions are GeoTIFFs; name the" in result.output
    result = run(["predict", image, "-m", str(tiny_checkpoint), "--co", "COMPRES=LZW", *out])
    assert result.exit_code == 2
    assert "--co COMPRES=LZW: driver GTiff does not support creation option" in result.output
    result = run(["predict", image, "-m", str(tiny_checkpoint), "--co", "ZLEVEL=99", *out])
    assert result.exit_code == 2 and "ZLEVEL=99 value not recognised" in result.output
    result = run(["predict", image, "-m", str(tiny_checkpoint), "--cog", "--co", "TILED=YES", *out])
    assert result.exit_code == 2 and "driver COG does not support creation option" in result.output
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "x.png").exists()


def test_nodata_value_from_option_or_checkpoint(make_raster, tmp_path):
    image = np.random.default_rng(5).integers(1, 256, (3, 40, 50), dtype=np.uint8)
    image[:, :, :6] = 7  # a border of 7s, with no nodata set in the raster
    source = make_raster("border.tif", image)
    border = np.zeros((40, 50), bool)
    border[:, :6] = True
    out = tmp_path / "opt.tif"
    predict_raster(StandIn(pixelwise), source, out, PredictOptions(32, 16, nodata=7))
    np.testing.assert_array_equal(read(out)[0][0] == 255, border)
    engine = StandIn(pixelwise)
    engine.info.input.nodata = 7  # trained with nodata 7: used when the raster has no mask
    out = tmp_path / "ckpt.tif"
    predict_raster(engine, source, out, PredictOptions(32, 16))
    np.testing.assert_array_equal(read(out)[0][0] == 255, border)


def test_all_nodata_input_is_refused(make_raster, tmp_path):
    source = make_raster("empty.tif", np.zeros((3, 30, 30), dtype=np.uint8), nodata=0)
    engine = StandIn(pixelwise)
    with pytest.raises(InputError, match="every pixel of the predicted area is nodata"):
        predict_raster(engine, source, tmp_path / "empty_pred.tif")
    assert engine.calls == 0 and not (tmp_path / "empty_pred.tif").exists()


@pytest.mark.parametrize("kill", [False, True], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_leaves_no_output_and_no_temp(scene, tmp_path, monkeypatch, kill):
    engine = StandIn(pixelwise, fail_after=3)
    if kill:
        engine.interrupt = lambda: signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    monkeypatch.setattr("geoseg_cli.inference.load_runtime", lambda path, device: engine)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "interrupted.tif"
    result = run([
        "predict", str(scene["image"]), "-m", "m.pt", "-o", str(out), "--batch-size", "1",
        "--probabilities", "--vector", str(tmp_path / "v.geojson"),
    ])  # fmt: skip
    assert result.exit_code == (143 if kill else 130) and "interrupted" in result.output
    assert engine.calls == 3
    assert sorted(tmp_path.iterdir()) == before
