"""The shared engine on ONNX Runtime: backbone and head graphs exported beside model.onnx."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
from conftest import save_tiny_checkpoint
from test_shared import probabilities, read, run

from geoseg_cli.errors import UsageError
from geoseg_cli.export.metadata import split_paths
from geoseg_cli.export.onnx import export_onnx
from geoseg_cli.inference import PredictOptions, predict_raster
from geoseg_cli.inference.onnx_runtime import OnnxRuntime
from geoseg_cli.inference.torch_runtime import TorchRuntime


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("split")
    checkpoint = save_tiny_checkpoint(folder / "m.pt", window=32, seed=10)
    result = export_onnx(checkpoint, folder / "m.onnx")
    assert (result.backbone, result.head) == split_paths(folder / "m.onnx")
    assert result.split_max_abs_diff <= 1e-4
    return checkpoint, result.path


def test_onnx_split_graphs_match_pytorch(onnx_export, nodata_scene, tmp_path):
    checkpoint, model = onnx_export
    torch_engine, onnx_engine = TorchRuntime(checkpoint, "cpu"), OnnxRuntime(model, "cpu")
    # GNN1's 128 hidden features, 9 taps of M and L per class (scg-gcn)
    channels = 128 + 10 * torch_engine.info.model.num_classes
    assert onnx_engine.feature_channels == torch_engine.feature_channels == channels
    tile = np.random.default_rng(2).random((1, 3, 48, 80), dtype=np.float32)
    features = torch_engine.features(tile)
    assert features.shape == (1, channels, 3, 5)
    np.testing.assert_allclose(onnx_engine.features(tile), features, atol=1e-4 * features.max())
    patch = np.ascontiguousarray(np.concatenate([features[..., :2, :2], features[..., 1:, 3:]]))
    logits = torch_engine.head_logits(patch)
    assert logits.shape == (2, torch_engine.info.model.num_classes, 2, 2)
    np.testing.assert_allclose(onnx_engine.head_logits(patch), logits, atol=1e-4)
    with pytest.raises(UsageError, match="exported for 32×32 windows"):
        onnx_engine.head_logits(features)

    maps = {}
    for name, path in (("pt", checkpoint), ("onnx", model)):
        out = tmp_path / f"{name}.tif"
        result = run(["predict", nodata_scene, "-m", path, "-o", out, "--tta", "--probabilities",
                      "--probability-dtype", "float32", "--engine", "shared"])  # fmt: skip
        assert result.exit_code == 0, result.output
        with rasterio.open(out) as ds:
            assert ds.tags()["ENGINE"] == "shared"
        maps[name] = (read(out), probabilities(out))
    assert (maps["pt"][0] == maps["onnx"][0]).mean() >= 0.999
    assert np.abs(maps["pt"][1] - maps["onnx"][1]).max() <= 1e-4


def test_onnx_without_matching_parts_uses_the_window_engine(onnx_export, nodata_scene, tmp_path,
                                                            caplog):  # fmt: skip
    _, model = onnx_export
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(model.read_bytes())
    logging.getLogger("geoseg_cli").addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="geoseg_cli")
    try:
        engine = OnnxRuntime(copy, "cpu")  # a renamed model.onnx, alone
        assert engine.feature_channels is None
        assert (
            "copy.onnx: no backbone graph (copy.backbone.onnx or m.backbone.onnx) beside it"
            in caplog.text
        )
        out = tmp_path / "alone.tif"
        predict_raster(engine, nodata_scene, out, PredictOptions(engine="shared"))
        with rasterio.open(out) as ds:
            assert ds.tags()["ENGINE"] == "window"
        assert "cannot run its backbone and head separately" in caplog.text
        backbone, head = split_paths(model)
        (tmp_path / backbone.name).write_bytes(backbone.read_bytes())
        (tmp_path / head.name).write_bytes(head.read_bytes() + b"\0")  # not the exported file
        assert OnnxRuntime(copy, "cpu").feature_channels is None
        assert "m.head.onnx does not belong to" in caplog.text
        (tmp_path / head.name).write_bytes(head.read_bytes())  # the parts keep their names
        assert OnnxRuntime(copy, "cpu").feature_channels == 128 + 10 * 3  # 3 classes
        for part in ("backbone", "head"):  # or are renamed with the model
            (tmp_path / f"m.{part}.onnx").rename(tmp_path / f"copy.{part}.onnx")
        assert OnnxRuntime(copy, "cpu").feature_channels == 128 + 10 * 3
        proto = onnx.load(copy)  # as exported before head graphs output logits
        (entry,) = [p for p in proto.metadata_props if p.key == "geoseg"]
        metadata = json.loads(entry.value)
        del metadata["split_graphs"]["head_output"]
        entry.value = json.dumps(metadata)
        onnx.save(proto, copy)
        assert OnnxRuntime(copy, "cpu").feature_channels is None
        assert "copy.onnx: its head graph comes from an earlier geoseg" in caplog.text
    finally:
        logging.getLogger("geoseg_cli").removeHandler(caplog.handler)


def test_export_no_split_writes_model_onnx_alone(onnx_export, tmp_path):
    checkpoint, _ = onnx_export
    out = tmp_path / "alone.onnx"
    result = run(["export", "onnx", checkpoint, "-o", out, "--no-split"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.onnx"]
    assert OnnxRuntime(out, "cpu").feature_channels is None
