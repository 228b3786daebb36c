"""ONNX export, the ONNX Runtime engine, ``geoseg info``, and real clients (GeoDeep).

Exports are the slow part (a few seconds each), so one fp32 export of a tiny scg-gcn
(resnet18, 64-px window) is shared by the module; other exports are one per variant or
precision.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
import torch
from click.testing import CliRunner
from conftest import synthetic_scene, write_raster

import geoseg_cli.export.metadata as metadata_module
import geoseg_cli.export.onnx as export_module
from geoseg_cli.checkpoint import (
    Checkpoint,
    ClassInfo,
    InputSpec,
    ModelInfo,
    ModelSpec,
    create_model_from_spec,
    save_checkpoint,
)
from geoseg_cli.cli import cli
from geoseg_cli.errors import CheckpointError, GeosegError, UsageError
from geoseg_cli.export.metadata import (
    DEFAULT_RESOLUTION_CM,
    FP32_TOLERANCE,
    deepness_metadata,
    resolution_cm,
)
from geoseg_cli.export.onnx import EXPORT_BATCH, export_onnx
from geoseg_cli.export.parity import parity_inputs
from geoseg_cli.inference.onnx_runtime import OnnxRuntime, import_onnx_dependency, select_providers
from geoseg_cli.inference.torch_runtime import TorchRuntime
from models import InferenceModel

WINDOW = 64
CLASSES = [
    ClassInfo("background", (0, 0, 0)),
    ClassInfo("building", (230, 25, 75)),
    ClassInfo("tree", (60, 180, 75)),
]


MEAN, STD = [0.45, 0.5, 0.4], [0.2, 0.22, 0.25]


def calibrate_batchnorm(model: torch.nn.Module) -> None:
    """Re-estimate BatchNorm statistics on one batch of a synthetic scene.

    An untrained network's class map then follows the image instead of being one class.
    """
    image, _ = synthetic_scene(64, 192, num_classes=3, seed=2)
    x = (torch.from_numpy(image).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD
    ).view(3, 1, 1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.stack([x[:, :, i : i + 64] for i in (0, 64, 128)]))
    model.eval()


def make_checkpoint(
    path: Path, variant: str = "scg-gcn", window: int = WINDOW, calibrate: bool = False
) -> Path:
    """An untrained 3-band, 3-class checkpoint with uint8 /255 scaling (GeoDeep's input).

    0.5 m resolution and non-trivial standardization.
    """
    torch.manual_seed(0)
    spec = ModelSpec(variant, "resnet18", num_classes=3, in_channels=3)
    model = create_model_from_spec(spec)
    if calibrate:
        calibrate_batchnorm(model)
    ckpt = Checkpoint(
        model=spec,
        classes=CLASSES,
        ignore_index=255,
        input=InputSpec([1, 2, 3], "uint8", 1 / 255, MEAN, STD, resolution=0.5),
        window=window,
        state_dict=model.state_dict(),
        training={"epoch": 3, "step": 120, "best_metric": 0.625},
    )
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    return make_checkpoint(workdir / "model.pt", calibrate=True)


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> export_module.ExportResult:
    """fp32, fixed 64-px window, recommended stride = window (no overlap, for GeoDeep)."""
    torch.set_num_threads(2)
    return export_onnx(checkpoint, checkpoint.with_suffix(".onnx"), stride=WINDOW)


@pytest.fixture(scope="module")
def scene_tif(workdir: Path) -> Path:
    """A 128×192 UTM 0.5 m RGB scene: a whole number of 64-px windows, as GeoDeep tiles it."""
    image, _ = synthetic_scene(128, 192, num_classes=3, seed=1)
    return write_raster(workdir / "scene.tif", image)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


def read_band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# --- the exported file ---------------------------------------------------------------


def test_fp32_export_is_one_checked_opset17_file(exported, checkpoint):
    assert exported.max_abs_diff <= FP32_TOLERANCE
    assert exported.parity_shapes[0][0] != EXPORT_BATCH
    # One self-contained file: every weight inside it, no external-data side files.
    assert not [
        p for p in exported.path.parent.iterdir() if p.suffix not in (".onnx", ".pt", ".tif")
    ]
    proto = onnx.load(str(exported.path))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert proto.ir_version == 8  # what opset 17 needs: QGIS bundles old onnxruntime releases
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    (graph_in,), (graph_out,) = proto.graph.input, proto.graph.output
    dims = [d.dim_value or d.dim_param for d in graph_in.type.tensor_type.shape.dim]
    assert graph_in.name == "image" and isinstance(dims[0], str) and dims[1:] == [3, 64, 64]
    assert graph_in.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph_out.name == "probabilities"

    # Independent check through both engines, at yet another batch size.
    batch = np.random.default_rng(5).random((5, 3, WINDOW, WINDOW), dtype=np.float32)
    onnx_probs = OnnxRuntime(exported.path, "cpu").predict(batch)
    torch_probs = TorchRuntime(checkpoint, "cpu").predict(batch)
    assert onnx_probs.shape == (5, 3, WINDOW, WINDOW) and onnx_probs.dtype == np.float32
    assert np.abs(onnx_probs - torch_probs).max() <= FP32_TOLERANCE
    np.testing.assert_allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    ["scg-gin", "scg-gcn-gin", "scgae-gcn", "scgdir-gcn", "scgdir-gcn-gin", "scg-gcn-ns"],
)
def test_every_variant_matches_pytorch(variant, tmp_path):
    """scg-gcn is covered by the shared export above; 32-px windows keep this quick."""
    ckpt = make_checkpoint(tmp_path / f"{variant}.pt", variant=variant, window=32)
    result = export_onnx(ckpt, tmp_path / f"{variant}.onnx", split=False)
    assert result.parity_shapes == [[3, 3, 32, 32]]  # not the traced batch of 2
    assert result.max_abs_diff <= FP32_TOLERANCE
    single = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    onnx_probs = OnnxRuntime(result.path, "cpu").predict(single)
    diff = onnx_probs - TorchRuntime(ckpt, "cpu").predict(single)
    assert np.abs(diff).max() <= FP32_TOLERANCE


def test_dynamic_size_export_via_cli_json(checkpoint, tmp_path):
    out = tmp_path / "dyn.onnx"
    result = invoke("export", "onnx", checkpoint, "-o", out, "--dynamic-size", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dynamic_size"] is True and report["precision"] == "fp32"
    assert report["parity_shapes"] == [[3, 3, 64, 64], [1, 3, 80, 96]]
    assert report["max_abs_diff"] <= FP32_TOLERANCE
    engine = OnnxRuntime(out, "cpu")
    assert engine.input_size is None
    assert engine.predict(np.zeros((2, 3, 48, 112), np.float32)).shape == (2, 3, 48, 112)


def test_int8_export_reports_parity_and_class_agreement(checkpoint, exported, tmp_path):
    result = export_onnx(checkpoint, tmp_path / "int8.onnx", precision="int8")
    # Reported, not bounded tightly: int8 flips near-tied classes of this untrained model.
    assert 0 < result.max_abs_diff <= 1
    assert result.class_agreement >= 0.9
    assert result.size_bytes < 0.35 * exported.size_bytes
    proto = onnx.load(str(result.path))
    assert "DynamicQuantizeLinear" in {n.op_type for n in proto.graph.node}
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert proto.ir_version == 8
    engine = OnnxRuntime(result.path, "cpu")
    assert engine.metadata["precision"] == "int8"
    assert engine.info.describe() == OnnxRuntime(exported.path, "cpu").info.describe()


def test_fp16_export_keeps_float32_io(checkpoint, tmp_path):
    result = export_onnx(checkpoint, tmp_path / "fp16.onnx", precision="fp16")
    assert result.max_abs_diff < 2e-2
    assert result.class_agreement >= 0.99
    proto = onnx.load(str(result.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)


def test_failed_parity_writes_nothing(checkpoint, exported, tmp_path, monkeypatch):
    traced = onnx.load(str(exported.path))
    monkeypatch.setattr(export_module, "trace", lambda *args: traced)
    monkeypatch.setattr(export_module, "parity", lambda *args: (3e-3, 0.99))
    out = tmp_path / "bad.onnx"
    with pytest.raises(GeosegError, match="does not match PyTorch") as error:
        export_onnx(checkpoint, out)
    assert "float32 error vs float64 is" in str(error.value) and "--tolerance" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_parity_inputs_follow_the_training_band_statistics():
    """Parity runs on input the model can meet.

    An 11-bit pan band scaled by 1/10000 has mean 0.045 and std 0.026, so uniform [0, 1) values
    would sit up to 37 std away, where float32 rounding in a trained model exceeded the
    tolerance (1.4e-4) although the graph was right.
    """
    module = InferenceModel(torch.nn.Identity(), [0.045], [0.026])
    first = list(parity_inputs(module, [(2, 1, 64, 64), (1, 1, 80, 96)]))
    again = list(parity_inputs(module, [(2, 1, 64, 64), (1, 1, 80, 96)]))
    assert [tuple(x.shape) for x in first] == [(2, 1, 64, 64), (1, 1, 80, 96)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    z = torch.cat([((x - 0.045) / 0.026).flatten() for x in first])
    assert min(float(x.min()) for x in first) >= 0.0 and max(float(x.max()) for x in first) <= 1
    assert float(z.abs().max()) < 6 and abs(float(z.mean())) < 0.05
    assert 0.9 < float(z.std()) < 1.1


def test_export_refuses_existing_output_and_bad_options(checkpoint, exported):
    result = invoke("export", "onnx", checkpoint, "-o", exported.path)
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = invoke("export", "onnx", checkpoint, "--fp16", "--int8")
    assert result.exit_code == 2 and "exclude each other" in result.output
    with pytest.raises(UsageError, match="stride"):
        export_onnx(checkpoint, exported.path.with_name("x.onnx"), stride=WINDOW + 1)


# --- metadata: geoseg's own and the keys Deepness / GeoDeep read -----------------------


def test_metadata_follows_deepness_and_geodeep_rules(exported, checkpoint):
    meta = {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}
    assert meta == exported.metadata
    values = {key: json.loads(text) for key, text in meta.items()}  # every value is JSON

    # QGIS Deepness (processing/models/model_base.py) parsing rules.
    assert str(values["model_type"]).capitalize() == "Segmentor"
    assert meta["model_type"] == '"Segmentor"'
    names = sorted(values["class_names"].items(), key=lambda kv: int(kv[0]))
    assert [int(k) for k, _ in names] == list(range(len(names)))  # consecutive from 0
    assert [v for _, v in names] == ["background", "building", "tree"]
    for key in ("tile_size", "tiles_size", "tiles_overlap", "seg_small_segment"):
        assert type(values[key]) is int, key
    assert values["tile_size"] == values["tiles_size"] == WINDOW
    assert values["tiles_overlap"] == 0  # exported with stride = window
    assert values["seg_small_segment"] == 0 and values["seg_thresh"] == 0.0
    assert values["resolution"] == pytest.approx(50.0)  # 0.5 m pixels → cm/px
    assert values["standardization_mean"] == [0.0] * 3
    assert values["standardization_std"] == [1.0] * 3

    # geoseg's own description round-trips to the checkpoint's contract.
    geoseg = values["geoseg"]
    info = TorchRuntime(checkpoint, "cpu").info
    assert ModelInfo.from_dict(geoseg).describe() == info.describe()
    assert geoseg["recommended_stride"] == WINDOW and geoseg["opset"] == 17

    # GeoDeep reads the same file into its own config.
    from geodeep.inference import create_session

    _, config = create_session(str(exported.path))
    assert config["model_type"] == "Segmentor" and config["tiles_size"] == WINDOW
    assert config["resolution"] == 50.0 and config["tiles_overlap"] == 0.0
    assert config["seg_small_segment"] == 0 and config["seg_thresh"] == 0.0


def test_overlap_and_resolution_rules(checkpoint, caplog):
    metadata_module.log.addHandler(caplog.handler)  # the CLI stops geoseg_cli propagating
    info = TorchRuntime(checkpoint, "cpu").info
    assert deepness_metadata(info, stride=32, resolution=50.0)["tiles_overlap"] == 50
    assert deepness_metadata(info, stride=48, resolution=50.0)["tiles_overlap"] == 25
    assert resolution_cm(info) == pytest.approx(50.0)
    assert resolution_cm(info, 30.0) == 30.0  # an explicit flag wins
    info.input.resolution = None
    assert resolution_cm(info, 12.5) == 12.5
    assert resolution_cm(info) == DEFAULT_RESOLUTION_CM
    metadata_module.log.removeHandler(caplog.handler)
    assert "--resolution" in caplog.text
    with pytest.raises(UsageError):
        resolution_cm(info, -1.0)


# --- the ONNX Runtime engine ---------------------------------------------------------


def test_select_providers():
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("auto", both) == both
    assert select_providers("cuda", both) == both
    assert select_providers("cpu", both) == ["CPUExecutionProvider"]
    assert select_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="onnxruntime-gpu"):
        select_providers("cuda", ["CPUExecutionProvider"])


def test_engine_refuses_foreign_corrupt_and_missing_models(tmp_path, exported):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    graph = onnx.helper.make_graph([node], "foreign", [value], [out])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(
        onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8
        ),
        foreign,
    )
    with pytest.raises(CheckpointError, match="no geoseg metadata"):
        OnnxRuntime(foreign, "cpu")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxRuntime(corrupt, "cpu")
    with pytest.raises(CheckpointError, match="no such ONNX model file"):
        OnnxRuntime(tmp_path / "missing.onnx", "cpu")
    result = invoke("info", foreign)
    assert result.exit_code == 1 and "no geoseg metadata" in result.output
    assert len(result.output.strip().splitlines()) == 1

    engine = OnnxRuntime(exported.path, "cpu")
    assert engine.input_size == WINDOW and engine.providers == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="--window 64"):
        engine.predict(np.zeros((1, 3, 32, 32), np.float32))


def test_missing_runtime_gives_install_hint(monkeypatch, exported, scene_tif, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(GeosegError, match=r"pip install 'geoseg\[onnx\]'"):
        import_onnx_dependency("onnxruntime")
    result = invoke("predict", scene_tif, "-m", exported.path, "-o", tmp_path / "x.tif")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: onnxruntime is not installed; ONNX support needs: pip install 'geoseg[onnx]'"
    ]


# --- geoseg info ---------------------------------------------------------------------


def test_info_json_for_onnx_and_checkpoint(exported, checkpoint):
    result = invoke("info", exported.path, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["onnx"]["opset"] == 17
    assert data["onnx"]["inputs"] == [
        {"name": "image", "dtype": "float32", "shape": ["batch", 3, 64, 64]}
    ]
    assert data["onnx"]["outputs"][0]["name"] == "probabilities"
    assert data["onnx"]["metadata"]["model_type"] == '"Segmentor"'
    assert [c["name"] for c in data["classes"]] == ["background", "building", "tree"]
    assert data["model"]["variant"] == "scg-gcn" and data["window"] == WINDOW
    assert data["recommended_stride"] == WINDOW

    result = invoke("info", checkpoint, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["training"] == {"epoch": 3, "step": 120, "best_metric": 0.625}
    assert data["input"]["scale"] == pytest.approx(1 / 255) and "onnx" not in data

    text = invoke("info", exported.path).stdout
    assert "opset 17" in text and "scg-gcn" in text and "#e6194b" in text


# --- predict through ONNX Runtime, and GeoDeep as a real client ----------------------


def test_predict_onnx_matches_pytorch(exported, checkpoint, scene_tif, tmp_path):
    maps, probabilities = {}, {}
    for name, model in (("pt", checkpoint), ("onnx", exported.path)):
        out = tmp_path / f"{name}.tif"
        result = invoke(
            "predict", scene_tif, "-m", model, "-o", out, "--device", "cpu",
            "--probabilities", "--probability-dtype", "float32",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        with rasterio.open(out) as src:
            maps[name] = src.read(1)
            assert src.crs.to_epsg() == 32618 and src.transform.a == 0.5
        probabilities[name] = rasterio.open(tmp_path / f"{name}_probabilities.tif").read()
    counts = np.bincount(maps["pt"].ravel(), minlength=3) / maps["pt"].size
    assert (counts >= 0.05).sum() >= 2  # a non-trivial map: agreement is not a given
    assert (maps["pt"] == maps["onnx"]).mean() >= 0.999
    assert np.abs(probabilities["pt"] - probabilities["onnx"]).max() <= FP32_TOLERANCE


def test_fixed_size_model_refuses_other_window(exported, scene_tif, tmp_path):
    out = tmp_path / "w32.tif"
    result = invoke("predict", scene_tif, "-m", exported.path, "-o", out, "--window", "32")
    assert result.exit_code == 2 and "--window 64" in result.output
    assert not out.exists()


def test_geodeep_runs_the_export_like_geoseg(exported, scene_tif, tmp_path, monkeypatch):
    """GeoDeep's CLI (-t mask) on the exported model vs geoseg predict with the same windows.

    Stride = window, no TTA. GeoDeep divides uint8 by 255 like the model's InputSpec.
    """
    from geodeep.scripts.main import main as geodeep_main
    from geodeep.utils import median_filter

    mask_path = tmp_path / "geodeep_mask.tif"
    argv = ["geodeep", str(scene_tif), str(exported.path), "-t", "mask", "-o", str(mask_path), "-q"]
    monkeypatch.setattr(sys, "argv", argv)
    geodeep_main()
    ours = tmp_path / "geoseg.tif"
    result = invoke("predict", scene_tif, "-m", exported.path, "-o", ours, "--stride", WINDOW)
    assert result.exit_code == 0, result.output

    with rasterio.open(mask_path) as gd, rasterio.open(scene_tif) as src:
        assert gd.crs == src.crs and gd.transform == src.transform and gd.shape == src.shape
        theirs = gd.read(1)
    mine = read_band(ours)
    assert (np.bincount(mine.ravel(), minlength=3) / mine.size >= 0.05).sum() >= 2
    assert (mine == theirs).mean() >= 0.99
    # GeoDeep smooths its mask with a 5×5 median; with the same filter the maps are equal.
    assert (median_filter(mine, 5) == theirs).mean() >= 0.999
