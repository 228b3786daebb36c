"""The ONNX deployment path: no PyTorch import, the header reader, tuned sessions, int8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import synthetic_scene, write_raster

from geoseg_cli.errors import UsageError
from geoseg_cli.export.onnx import export_onnx
from geoseg_cli.inference.onnx_header import ProtobufError, read_onnx_header

#: Runs the geoseg CLI in-process, then prints whether torch and onnx were imported.
_WRAPPER = """
import json, sys
from geoseg_cli.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="geoseg", standalone_mode=False)
finally:
    print(json.dumps({m: m in sys.modules for m in ("torch", "onnx")}), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint exported with dynamic size (and its split graphs)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return export_onnx(tiny_checkpoint, out, dynamic_size=True).path


@pytest.fixture(scope="module")
def scene_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 96×80 RGB uint8 scene."""
    image, _ = synthetic_scene(96, 80, num_classes=3, seed=4)
    return write_raster(tmp_path_factory.mktemp("scene") / "scene.tif", image)


def run_cli(*args: object) -> dict[str, bool]:
    """Run ``geoseg ARGS`` in a fresh interpreter; which of torch and onnx it imported."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("engine", ["window", "shared"])
def test_onnx_predict_never_imports_torch(onnx_model, scene_tif, tmp_path, engine):
    out = tmp_path / f"{engine}.tif"
    args = ["-q", "predict", scene_tif, "-m", onnx_model, "-o", out, "--engine", engine]
    imported = run_cli(*args, "--tta", "flip", "--probabilities")
    assert imported == {"torch": False, "onnx": False}
    with rasterio.open(out) as src:
        assert src.tags()["ENGINE"] == engine and src.read(1).shape == (96, 80)


def test_info_and_help_never_import_torch_or_onnx(onnx_model):
    assert run_cli("info", onnx_model, "--json") == {"torch": False, "onnx": False}
    assert run_cli("--help") == {"torch": False, "onnx": False}


def test_header_reader_matches_the_onnx_package(onnx_model, tmp_path):
    import onnx

    proto = onnx.load(str(onnx_model))
    header = read_onnx_header(onnx_model)
    assert header["metadata"] == {p.key: p.value for p in proto.metadata_props}
    assert header["opset"] == next(o.version for o in proto.opset_import if o.domain == "")
    assert header["ir_version"] == proto.ir_version
    assert header["inputs"] == [
        {"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}
    ]
    assert [o["name"] for o in header["outputs"]] == ["probabilities"]
    bad = tmp_path / "bad.onnx"
    for content in (b"", b"not a protobuf at all", onnx_model.read_bytes()[:1000]):
        bad.write_bytes(content)
        with pytest.raises(ProtobufError):
            read_onnx_header(bad)
    assert np.dtype(header["inputs"][0]["dtype"]) == np.float32


def test_static_int8_is_qdq_calibrated_on_chips_and_agrees(tiny_checkpoint, chips, tmp_path):
    import onnx

    from geoseg_cli.inference.onnx_runtime import OnnxRuntime

    result = export_onnx(tiny_checkpoint, tmp_path / "int8.onnx", precision="int8", calibrate=chips)
    assert result.class_agreement >= 0.9
    for path in (result.path, result.backbone):
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 20
        assert "DynamicQuantizeLinear" not in ops and "ConvInteger" not in ops
        # per-channel weights: a weight DequantizeLinear has one scale per output channel
        proto = onnx.load(str(path))
        scales = {i.name: i.dims for i in proto.graph.initializer}
        weight_dq = [
            n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in scales
        ]
        assert any(len(scales[n.input[1]]) == 1 and scales[n.input[1]][0] > 1 for n in weight_dq)
    head_ops = {n.op_type for n in onnx.load(str(result.head)).graph.node}
    assert "QuantizeLinear" not in head_ops  # the head stays float
    engine = OnnxRuntime(result.path, "cpu")
    assert engine.metadata["precision"] == "int8" and engine.metadata["quantization"] == "static"
    fp32 = OnnxRuntime(export_onnx(tiny_checkpoint, tmp_path / "fp32.onnx").path, "cpu")
    image, _ = synthetic_scene(64, 64, num_classes=3, seed=5)
    batch = np.stack([image[:, :32, :32], image[:, 32:, 32:]]).astype(np.float32) / 255
    agree = (engine.predict(batch).argmax(1) == fp32.predict(batch).argmax(1)).mean()
    assert agree >= 0.9
    with pytest.raises(UsageError, match="--calibrate goes with --int8"):
        export_onnx(tiny_checkpoint, tmp_path / "x.onnx", calibrate=chips)


def test_split_window_path_gives_the_whole_graphs_probabilities(onnx_model):
    from geoseg_cli.inference.onnx_runtime import OnnxRuntime, run_session

    engine = OnnxRuntime(onnx_model, "cpu")
    assert engine.feature_channels is not None  # predict runs backbone + head + numpy
    image, _ = synthetic_scene(64, 96, num_classes=3, seed=6)
    batch = np.stack([image[:, :, :48], image[:, :, 48:]]).astype(np.float32) / 255
    whole = run_session(engine.session, batch, on_gpu=False)
    split = engine.predict(batch)
    assert split.shape == whole.shape == (2, 3, 64, 48)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    np.testing.assert_allclose(split.sum(axis=1), 1, atol=1e-5)


def test_session_options_use_every_core_without_spinning():
    from geoseg_cli.inference.onnx_runtime import session_options, usable_cores

    options = session_options()
    assert options.intra_op_num_threads == usable_cores() >= 1
    assert options.inter_op_num_threads == 1
    assert options.enable_mem_pattern and options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(3).intra_op_num_threads == 3


def test_balanced_batch_fills_the_fewest_passes_evenly():
    from geoseg_cli.inference.predict import balanced_batch

    assert [balanced_batch(n, 4) for n in (1, 4, 5, 9, 16, 17)] == [1, 4, 3, 3, 4, 4]
    assert balanced_batch(9, 16) == 9


def test_read_ahead_and_write_behind():
    from geoseg_cli.inference.background import ReadAhead, WriteBehind

    with ReadAhead(lambda i: i * i, 4) as ahead:
        assert [ahead.get(i) for i in range(4)] == [0, 1, 4, 9]
        with pytest.raises(IndexError):
            ahead.get(7)

    class Writer:
        def __init__(self) -> None:
            self.rows: list[int] = []

        def write(self, data: np.ndarray, valid: np.ndarray) -> None:
            if data.shape[1] == 0:
                raise OSError("disk full")
            self.rows.append(data.shape[1])

    writer = Writer()
    with WriteBehind([writer]) as behind:
        for n in (3, 5, 2):
            behind.write(np.ones((n, 4), bool), np.zeros((1, n, 4)))
    assert writer.rows == [3, 5, 2]
    with pytest.raises(OSError, match="disk full"), WriteBehind([Writer()]) as behind:
        behind.write(np.ones((0, 4), bool), np.zeros((1, 0, 4)))
