"""predict's shared-backbone engine: geometry, TTA, nodata, batching and plan."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from conftest import coarse_scene, save_tiny_checkpoint, synthetic_scene, write_chips, write_raster
from rasterio.windows import Window
from torch.utils.flop_counter import FlopCounterMode

from geoseg_cli.checkpoint import ClassInfo, InputSpec, ModelInfo, ModelSpec
from geoseg_cli.cli import cli
from geoseg_cli.inference import PredictOptions, predict_raster
from geoseg_cli.inference.plan import Plan
from geoseg_cli.inference.predict import WindowPredictor
from geoseg_cli.inference.shared import SharedPredictor, split_span
from geoseg_cli.inference.torch_runtime import TorchRuntime
from geoseg_cli.inference.tta import tta_views
from geoseg_cli.inference.windows import Grid, reflect_indices
from geoseg_cli.train import train
from geoseg_cli.train_config import TrainConfig
from models import create_model
from models.inference import CHUNK_CELLS, mean_probabilities

torch.set_num_threads(2)


class LocalBackbone:
    """A runtime whose backbone sees no context and whose head depends on the whole window.

    Features are 16×16 block means; logits are the features minus their window mean. Tiles,
    seams and halos cannot change its features, so the shared and window engines must give
    the same probabilities; counts the work done.
    """

    on_gpu = False
    output_stride = 16
    streams = False

    def __init__(self, window: int = 32) -> None:
        self.info = ModelInfo(
            model=ModelSpec("local", "none", 3, 3),
            classes=[ClassInfo(f"c{i}", (i, i, i)) for i in range(3)],
            ignore_index=255,
            input=InputSpec([1, 2, 3], "uint8", 1 / 255, [0.0] * 3, [1.0] * 3),
            window=window,
        )
        self.model_hash = "local"
        self.feature_channels = 3
        self.backbone_pixels = self.head_windows = self.head_calls = self.window_images = 0

    def features(self, batch: np.ndarray) -> np.ndarray:
        n, c, h, w = batch.shape
        assert h % 16 == 0 and w % 16 == 0 and batch.dtype == np.float32
        self.backbone_pixels += n * h * w
        return batch.reshape(n, c, h // 16, 16, w // 16, 16).mean(axis=(3, 5))

    @staticmethod
    def _logits(features: np.ndarray) -> np.ndarray:
        return 8 * (features - features.mean(axis=(2, 3), keepdims=True))

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        self.head_calls += 1
        self.head_windows += len(features)
        return self._logits(features)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.window_images += len(batch)
        logits = self._logits(self.features(batch))
        return np.stack([self.probabilities(item[None]) for item in logits])

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return mean_probabilities(torch.from_numpy(logits)).numpy()


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def probabilities(path: Path) -> np.ndarray:
    return read(path.with_name(f"{path.stem}_probabilities.tif"))


def run(args: list[str]):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


# --- geometry: exactly the window engine when the backbone needs no context ------------


class TilesOnly:
    """A PyTorch runtime without its row streams.

    The shared engine cuts tiles, as it does for an ONNX model.
    """

    streams = False

    def __init__(self, runtime: TorchRuntime) -> None:
        self._runtime = runtime

    def __getattr__(self, name: str):
        return getattr(self._runtime, name)


class StreamingLocalBackbone(LocalBackbone):
    """:class:`LocalBackbone` with row streams; counts the streams and the rows fed."""

    streams = True

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.stream_count, self.rows_fed = 0, 0

    def feature_stream(self, view, rows: int, cols: int):
        self.stream_count += 1

        def push(pixels: np.ndarray, last: bool) -> np.ndarray:
            self.rows_fed += pixels.shape[1]
            return self.features(pixels[np.newaxis])[0]  # block means: the same in any view

        return push


def test_row_streams_restart_below_rows_no_window_needs(make_raster, tmp_path):
    """A 130-row nodata band holding whole row bands of windows.

    The streams skip it and restart with ``halo`` rows of context, and every window still gets
    the window engine's probabilities.
    """
    image, _ = synthetic_scene(200, 70, seed=2)
    image = np.maximum(image, 1)
    image[:, 40:170] = 0
    source = make_raster("band.tif", image, nodata=0)
    options = dict(window=48, stride=16, tta="flip", tile=32, halo=16, probabilities="float32")
    probs = {}
    for name, engine in (("window", LocalBackbone(48)), ("shared", StreamingLocalBackbone(48))):
        out = tmp_path / f"{name}.tif"
        predict_raster(engine, source, out, PredictOptions(engine=name, **options))
        probs[name] = probabilities(out)
    np.testing.assert_allclose(probs["shared"], probs["window"], atol=1e-5)
    # padded rows -16..224; the windows at rows 48..112 hold only nodata: the first streams
    # stop at row 80 (the window at 32 ends there), the next ones start at row 128 (the
    # next window) less 16 rows of context
    assert engine.stream_count == 2 * 3
    assert engine.rows_fed == 3 * ((80 + 16) + (224 - 112))


def test_split_span_cuts_near_equal_multiples_of_16():
    assert split_span(-32, 480, 128, 16) == [(-32, 96), (96, 224), (224, 352), (352, 480)]
    assert split_span(0, 208, 96, 16) == [(0, 80), (80, 144), (144, 208)]
    assert split_span(16, 32, 1024, 16) == [(16, 32)]


@pytest.mark.parametrize(
    ("tta", "tile", "halo", "stride"),
    [(None, 48, 16, 32), ("flip", 32, 0, 16), ("d4", 64, 32, 16)],
)
def test_local_backbone_gives_the_window_engines_probabilities(nodata_scene, tmp_path, tta,
                                                                tile, halo, stride):  # fmt: skip
    """Every window gets the window engine's probabilities, whatever the tiles.

    Tiles of 32–64 px with and without halo, non-square edge tiles, all TTA sets, a
    nodata corner and a nodata row band: every window's probabilities are the window
    engine's, and the backbone sees each padded pixel once per view (plus halos). Both
    engines start the grid on the feature grid (stride 32: half the overlap, 8 px, rounded
    to 16), so they place the same windows.
    """
    results, engines = {}, {}
    for engine in ("window", "shared"):
        stub = engines[engine] = LocalBackbone(window=48)
        out = tmp_path / f"{engine}.tif"
        options = PredictOptions(
            window=48, stride=stride, tta=tta, engine=engine, tile=tile, halo=halo,
            batch_size=5, probabilities="float32",
        )  # fmt: skip
        result = predict_raster(stub, nodata_scene, out, options)
        results[engine] = (read(out), probabilities(out), result)
        with rasterio.open(out) as ds:
            assert ds.tags()["ENGINE"] == engine
    (classes_w, probs_w, result_w), (classes_s, probs_s, result_s) = results.values()
    np.testing.assert_allclose(probs_s, probs_w, atol=1e-6)
    np.testing.assert_array_equal(classes_s, classes_w)
    assert (classes_w[0, :40, :50] == 255).all() and (classes_w[0, 60:64] == 255).all()
    assert result_s.windows == result_w.windows and result_s.skipped == result_w.skipped > 0

    views = {None: 1, "flip": 3, "d4": 8}[tta]
    grid = Grid(83, 117, 48, stride, 16)
    (top, bottom), (left, right) = grid.padded_rows, grid.padded_cols
    padded = (bottom - top) * (right - left)
    shared, window = engines["shared"], engines["window"]
    assert window.window_images == views * result_w.windows
    assert shared.window_images == 0 and shared.head_windows == views * result_s.windows
    rows, cols = split_span(top, bottom, tile, 16), split_span(left, right, tile, 16)
    most = (bottom - top + 2 * halo * (len(rows) - 1)) * (right - left + 2 * halo * (len(cols) - 1))
    assert shared.backbone_pixels <= views * most
    # Tiles under nodata-only windows are never computed, so fewer pixels may run.
    assert shared.backbone_pixels >= views * 0.5 * padded
    per_pass = max(1, 5 // views)  # whole windows per head pass of at most 5 views
    assert shared.head_calls == sum(
        -(-len(kept) // per_pass) for kept in _kept_per_band(nodata_scene, grid)
    )


def _kept_per_band(source: Path, grid: Grid) -> list[list[int]]:
    with rasterio.open(source) as ds:
        valid = ds.dataset_mask() > 0
    kept = []
    for r in grid.row_starts:
        band = valid[max(0, r) : r + grid.window].any(axis=0)
        kept.append([c for c in grid.col_starts if band[max(0, c) : c + grid.window].any()])
    return [k for k in kept if k]


@pytest.mark.parametrize("variant", ["scg-gcn", "mscg-gcn", "cdgc"])
def test_shared_predictor_matches_window_engine_where_a_tile_is_a_window(tmp_path, variant):
    """Windows that coincide with a tile get the window engine's probabilities.

    The real networks, tiles exactly one window wide (no halo), every TTA view.
    """
    path = save_tiny_checkpoint(tmp_path / "m.pt", window=32, seed=3, variant=variant)
    engine = TorchRuntime(path, "cpu")
    rng = np.random.default_rng(0)
    image = rng.random((3, 70, 100), dtype=np.float32)

    def read_region(rows, cols):
        r = reflect_indices(rows[0], rows[1], 70)
        c = reflect_indices(cols[0], cols[1], 100)
        return image[:, r][:, :, c]

    grid = Grid(70, 100, 32, 16, 16)
    classes = engine.info.model.num_classes
    plan = Plan(grid, Window(0, 0, 100, 70), (1, 2, 3), "float32", 1.0, None, tta_views("flip"),
                classes, None, "flip")  # fmt: skip
    shared = SharedPredictor(TilesOnly(engine), plan, read_region, batch_size=4, tile=32, halo=0)
    window = WindowPredictor(engine, plan, 3)
    (top, _), (left, right) = grid.padded_rows, grid.padded_cols
    aligned = 0
    for r in grid.row_starts:
        band = read_region((r, r + 32), (left, right))
        offsets = [int(c) - left for c in grid.col_starts]
        for o, a, b in zip(offsets, shared(band, offsets), window(band, offsets), strict=True):
            if (r - top) % 32 == 0 and o % 32 == 0:
                np.testing.assert_allclose(a, b, atol=2e-6)
                aligned += 1
            else:  # a window across tile seams sees other features: not the same
                assert np.abs(a - b).max() > 1e-3
    assert aligned >= 6


def test_row_streams_and_wide_halos_give_one_pass_over_the_area(nodata_scene, tmp_path):
    """resnet18's layer3 sees 211 px (105 px around a feature's cell).

    With a 112-px halo 48-px tiles give the features of one untiled pass, so the same
    probabilities, and so do the PyTorch engine's row streams (fed 16 rows at a time); without a
    halo the seams show.
    """
    engine = TorchRuntime(save_tiny_checkpoint(tmp_path / "m.pt", window=48, seed=3), "cpu")
    probs = {}
    for name, runtime, tile, halo in (
        ("one tile", TilesOnly(engine), 4096, 0),
        ("halo", TilesOnly(engine), 48, 112),
        ("seams", TilesOnly(engine), 48, 0),
        ("streams", engine, 48, 0),
    ):
        out = tmp_path / f"{name}.tif"
        options = PredictOptions(
            stride=16, tta="flip", engine="shared", tile=tile, halo=halo, probabilities="float32"
        )
        predict_raster(runtime, nodata_scene, out, options)
        probs[name] = probabilities(out)
    np.testing.assert_allclose(probs["halo"], probs["one tile"], atol=1e-4)
    np.testing.assert_allclose(probs["streams"], probs["one tile"], atol=1e-4)
    assert np.abs(probs["seams"] - probs["one tile"]).max() > 0.1


@pytest.mark.parametrize(("height", "width"), [(9, 4), (1, 3), (CHUNK_CELLS, 28)])
def test_mean_probabilities_is_interpolate_softmax_and_view_mean(height, width):
    """Bilinear ×16 upsampling (align_corners=False), softmax and the mean over views.

    On non-square windows, one whose height ends in a partial chunk and one a single
    feature row high.
    """
    logits = 4 * torch.randn(3, 5, height, width, generator=torch.Generator().manual_seed(0))
    size = (16 * height, 16 * width)
    upsampled = torch.nn.functional.interpolate(logits, size, mode="bilinear", align_corners=False)
    expected = torch.softmax(upsampled, dim=1).mean(dim=0)
    actual = mean_probabilities(logits)
    assert actual.shape == (5, *size)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    # one view: its softmax, so the classes sum to one everywhere
    one = mean_probabilities(logits[:1])
    torch.testing.assert_close(one, torch.softmax(upsampled[0], dim=0), atol=1e-6, rtol=0)
    torch.testing.assert_close(one.sum(0), torch.ones(size))


# --- the real network: batch size, TTA, nodata, plan -----------------------------------


def test_shared_engine_is_batch_size_independent_with_tta_and_nodata(nodata_scene, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "m.pt", window=48, seed=10)
    outs = []
    for batch in (1, 7):
        out = tmp_path / f"b{batch}.tif"
        result = run([
            "predict", nodata_scene, "-m", checkpoint, "-o", out, "--stride", "16", "--tta",
            "--engine", "shared",
            "--batch-size", batch, "--probabilities", "--probability-dtype", "float32",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        outs.append((read(out), probabilities(out)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5)
    classes = outs[0][0][0]
    with rasterio.open(nodata_scene) as src:
        nodata = src.dataset_mask() == 0
    np.testing.assert_array_equal(classes == 255, nodata)
    assert np.all(outs[0][1][:, nodata] == 0)
    assert (np.bincount(classes[~nodata], minlength=3) > 200).sum() >= 2  # not one class


def test_engines_agree_on_99_percent_of_valid_pixels_with_a_trained_model(tmp_path):
    """The engines agree on 99 % of the pixels of a trained model.

    A resnet18 SCG-Net trained for 30 epochs on 192-px chips of a coarse synthetic scene,
    predicted on a held-out part with a nodata corner at stride 48 with flip TTA (the
    paper's 448/112 protocol, scaled): the shared engine gives the window engine's class on
    at least 99 % of the valid pixels, and is as accurate against the labels.
    """
    window, train_rows = 192, 576
    full, full_labels = coarse_scene(train_rows + 336, 576, num_classes=3, factor=8, seed=7)
    chips = write_chips(tmp_path / "chips", full[:, :train_rows], full_labels[:train_rows], window)
    config = TrainConfig(
        chips, tmp_path / "run", backbone="resnet18", window=window, epochs=30, batch_size=2,
        lr=1e-3, workers=0, device="cpu", loss="dice+ce", recipe="paper",
    )  # fmt: skip
    train(config)
    image = np.maximum(full[:, train_rows:, :317], 1)
    labels = full_labels[train_rows:, :317]
    image[:, :20, :30] = 0
    raster = write_raster(tmp_path / "held_out.tif", image, nodata=0)
    engine = TorchRuntime(tmp_path / "run" / "best.pt", "cpu")
    classes = {}
    for name in ("window", "shared"):
        out = tmp_path / f"{name}.tif"
        predict_raster(engine, raster, out, PredictOptions(stride=48, tta="flip", engine=name))
        classes[name] = read(out)[0]
    valid = image[0] != 0
    assert np.all(classes["shared"][~valid] == 255)
    window_map, shared_map = classes["window"][valid], classes["shared"][valid]
    agreement = np.mean(window_map == shared_map)
    accuracy = {name: np.mean(classes[name][valid] == labels[valid]) for name in classes}
    assert agreement >= 0.99, (agreement, accuracy)
    assert accuracy["window"] > 0.97 and accuracy["shared"] > accuracy["window"] - 0.01, accuracy


def test_plan_rounds_stride_aligns_grid_and_falls_back(make_raster, tmp_path, caplog):
    image, _ = synthetic_scene(50, 70, seed=1)
    source = make_raster("s.tif", image)
    checkpoint = save_tiny_checkpoint(tmp_path / "m.pt", window=48)
    engine = TorchRuntime(checkpoint, "cpu")
    logging.getLogger("geoseg_cli").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="geoseg_cli")
    try:
        cases = [("shared", 20, "shared", "16"), ("window", 20, "window", "20"),
                 ("shared", 40, "window", "40"), ("shared", 48, "window", "48")]  # fmt: skip
        for engine_name, stride, used, tagged in cases:
            out = tmp_path / f"{engine_name}{stride}.tif"
            options = PredictOptions(stride=stride, engine=engine_name)
            predict_raster(engine, source, out, options)
            with rasterio.open(out) as ds:
                assert (ds.tags()["ENGINE"], ds.tags()["STRIDE"]) == (used, tagged)
        # (48 / 16)² windows × 3 views: the window engine's plan points to the shared one
        hint = PredictOptions(stride=16, tta="flip", engine="window")
        predict_raster(engine, source, tmp_path / "hint.tif", hint)
    finally:
        logging.getLogger("geoseg_cli").removeHandler(caplog.handler)
    assert "stride 20 rounded to 16" in caplog.text
    assert "stride 40 leaves the windows without overlap" in caplog.text  # 40 → 48 = T
    # (48 / 20)² = 5.8 passes at stride 20 without TTA: no hint there
    assert "runs the backbone about 6 times" not in caplog.text
    assert "the window engine runs the backbone about 27 times per pixel" in caplog.text
    # 70 px + 2 × 16 px margin, padded to whole windows: 112 px wide rows
    assert "backbone once per pixel and view streamed over 112 px wide rows" in caplog.text
    grid = Grid(50, 70, 48, 16, 16)
    assert grid.row_starts[0] == -16 and grid.col_starts[0] == -16  # margin 16, not 16 + 0
    assert Grid(50, 70, 448, 112, 16).row_starts[0] == -160  # 168 rounded down to 160
    assert Grid(50, 70, 32, 16, 16).row_starts[0] == -16  # 8 rounded to 16, not 0


def test_head_projects_once_per_position_and_aggregates_per_window():
    """The shared engine runs ``project`` once per position and ``decode`` per window and view.

    Every product with the 1024 backbone channels must be in ``project``, and GNN1 must
    aggregate X·W (Â·(X·W), n²·128 multiply-adds), not X ((Â·X)·W, n²·1024).
    """
    classes, n = 6, 28 * 28
    head = create_model("scg-gcn", classes, 3, backbone="resnet50").head.eval()
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            projected = head.project(torch.rand(1, 1024, 28, 28))
        assert counter.get_total_flops() == 2 * n * 1024 * (128 + 10 * classes)
        with FlopCounterMode(display=False) as counter:
            head.decode(projected)
    products = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    # Z·Zᵀ, Â·(X·W), H·W₂, Â·(H·W₂)
    assert products == 2 * (n * n * classes + n * n * 128 + n * 128 * classes + n * n * classes)


@pytest.mark.parametrize(("on_gpu", "tile", "batch"), [(False, 1024, 6), (True, 2048, 16)])
def test_tile_and_head_batch_defaults_follow_the_device(on_gpu, tile, batch):
    runtime = LocalBackbone(48)
    runtime.on_gpu = on_gpu
    plan = Plan(Grid(50, 70, 48, 16, 16), Window(0, 0, 70, 50), (1, 2, 3), "uint8", 1 / 255,
                None, tta_views(None), 3, None, None)  # fmt: skip
    shared = SharedPredictor(runtime, plan, lambda rows, cols: None)
    assert (shared.tile, shared.batch_size, shared.halo) == (tile, batch, 64)
