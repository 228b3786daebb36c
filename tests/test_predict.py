"""geoseg predict: window arithmetic, TTA, seamless blending, GeoTIFF output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import shapely.geometry
import torch
from click.testing import CliRunner
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from geoseg_cli.checkpoint import ClassInfo, InputSpec, ModelInfo, ModelSpec
from geoseg_cli.cli import cli
from geoseg_cli.inference import PredictOptions, predict_raster
from geoseg_cli.inference.outputs import output_paths
from geoseg_cli.inference.tta import tta_views
from geoseg_cli.inference.windows import Grid, coverage, reflect_indices, window_starts
from geoseg_cli.vector import write_class_polygons
from tests.conftest import ALBERS_WKT, UTM_CRS, UTM_TRANSFORM, save_tiny_checkpoint

torch.set_num_threads(2)


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


class StandIn:
    """A runtime whose probabilities are ``fn(batch)``; counts forward passes and images."""

    on_gpu = False
    output_stride = 16
    feature_channels = None
    streams = False

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        num_classes: int = 3,
        channels: int = 3,
        dtype: str = "uint8",
        window: int = 32,
        fail_after: int | None = None,
    ) -> None:
        self.info = ModelInfo(
            model=ModelSpec("stand-in", "none", num_classes, channels),
            classes=[ClassInfo(f"c{i}", (i, 2 * i, 3 * i)) for i in range(num_classes)],
            ignore_index=255,
            input=InputSpec(list(range(1, channels + 1)), dtype, 1 / 255, [0.0] * channels,
                            [1.0] * channels),
            window=window,
        )  # fmt: skip
        self.model_hash = "0123456789abcdef"
        self.fn = fn
        self.fail_after = fail_after
        self.calls = self.images = 0
        self.batches: list[np.ndarray] = []

    def interrupt(self) -> None:
        raise KeyboardInterrupt  # Ctrl-C

    def predict(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.shape[2] == batch.shape[3]
        if self.fail_after is not None and self.calls == self.fail_after:
            self.interrupt()
        self.calls += 1
        self.images += len(batch)
        self.batches.append(batch)
        return self.fn(batch)


def pixelwise(batch: np.ndarray) -> np.ndarray:
    """The identity stand-in: probabilities are a fixed function of each input pixel."""
    return softmax(8 * batch)


def box_blur(batch: np.ndarray) -> np.ndarray:
    """A flip- and rotation-equivariant stand-in: softmax of a symmetric 3×3 mean."""
    p = np.pad(batch, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = batch.shape[2:]
    mean = sum(p[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    return softmax(8 * mean)


def left_difference(batch: np.ndarray) -> np.ndarray:
    """Not flip-equivariant: depends on the pixel to the left."""
    return softmax(8 * (batch - np.roll(batch, 1, axis=-1)))


def read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(), {
            "crs": ds.crs,
            "transform": ds.transform,
            "nodata": ds.nodata,
            "dtype": ds.dtypes[0],
            "colormap": ds.colormap(1) if ds.count == 1 else None,
            "tags": ds.tags(),
            "mask": ds.dataset_mask(),
            "descriptions": ds.descriptions,
        }


# --- pure window arithmetic ---------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "window", "stride"),
    [(93, 32, 16), (67, 48, 20), (10, 64, 7), (64, 64, 64), (1, 16, 5)],
)
def test_grid_covers_each_pixel_and_writes_each_row_once(size, window, stride):
    starts = window_starts(size, window, stride)
    assert np.all(np.diff(starts) == stride)
    m = (window - stride) // 2
    assert starts[0] == -m and starts[-1] + window - m >= size
    assert starts[-1] - stride + window - m < size or len(starts) == 1  # no extra window
    assert coverage(starts, window, size).min() > 0
    grid = Grid(size, size, window, stride)
    written = np.concatenate(
        [np.arange(*grid.finished_rows(b)) for b in range(len(grid.row_starts))]
    )
    np.testing.assert_array_equal(written, np.arange(size))


@pytest.mark.parametrize(("start", "stop", "size"), [(-5, 12, 7), (-20, 30, 3), (0, 4, 1)])
def test_reflect_indices_match_numpy_pad(start, stop, size):
    padded = np.pad(np.arange(size), (max(0, -start), max(0, stop - size)), mode="reflect")
    expected = padded[start + max(0, -start) : stop + max(0, -start)]
    np.testing.assert_array_equal(reflect_indices(start, stop, size), expected)


# --- TTA --------------------------------------------------------------------------------


@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_tta_views_invert_and_are_distinct(tta):
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    views = tta_views(tta)
    assert len(views) == {"flip": 3, "d4": 8}[tta]
    for view in views:
        np.testing.assert_array_equal(view.invert(view.apply(x)), x)
    assert len({view.apply(x).tobytes() for view in views}) == len(views)


def test_tta_equivariant_model_gives_plain_output(make_raster, tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (3, 50, 70), dtype=np.uint8)
    source = make_raster("img.tif", image)
    results = {}
    for tta in (None, "flip", "d4"):
        engine = StandIn(box_blur)
        out = tmp_path / f"blur_{tta}.tif"
        options = PredictOptions(window=32, stride=16, tta=tta, probabilities="float32")
        predict_raster(engine, source, out, options)
        results[tta] = read(out.with_name(f"{out.stem}_probabilities.tif"))[0]
        views = {None: 1, "flip": 3, "d4": 8}[tta]
        assert engine.images == views * Grid(50, 70, 32, 16, 16).count  # every window, view
    np.testing.assert_allclose(results["flip"], results[None], atol=2e-6)
    np.testing.assert_allclose(results["d4"], results[None], atol=2e-6)
    # A model that is not flip-equivariant does change with TTA (so TTA really runs).
    plain = tmp_path / "diff.tif"
    flipped = tmp_path / "diff_tta.tif"
    for out, tta in ((plain, None), (flipped, "flip")):
        predict_raster(StandIn(left_difference), source, out, PredictOptions(32, 16, tta))
    assert not np.array_equal(read(plain)[0], read(flipped)[0])


# --- blending: no seams -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "window", "stride"),
    [(67, 93, 32, 16), (67, 93, 48, 20), (67, 93, 64, 64), (67, 93, 32, 5), (20, 27, 64, 24)],
)
def test_identity_model_reproduces_input_without_seams(make_raster, tmp_path, height, width,
                                                       window, stride):  # fmt: skip
    rng = np.random.default_rng(height * window + stride)
    image = rng.integers(0, 256, (3, height, width), dtype=np.uint8)
    image[:, :5, :9] = 0  # nodata corner
    source = make_raster("img.tif", image, nodata=0)
    out = tmp_path / "pred.tif"
    options = PredictOptions(
        window, stride, batch_size=5, probabilities="float32",
        creation_options={"BLOCKXSIZE": "16", "BLOCKYSIZE": "16"},
    )  # fmt: skip
    predict_raster(StandIn(pixelwise, window=window), source, out, options)
    expected = pixelwise(image[np.newaxis] / np.float32(255))[0]
    valid = np.ones((height, width), bool)
    valid[:5, :9] = False
    probs, meta = read(out.with_name("pred_probabilities.tif"))
    np.testing.assert_allclose(probs[:, valid], expected[:, valid], rtol=0, atol=1e-6)
    classes, meta = read(out)
    np.testing.assert_array_equal(classes[0][valid], expected.argmax(0)[valid])
    assert np.all(classes[0][~valid] == 255)
    assert np.array_equal(meta["mask"] > 0, valid)  # mask of the probabilities as well
    assert np.all(probs[:, ~valid] == 0)


def test_bounds_predict_part_with_real_context(make_raster, tmp_path):
    image = np.random.default_rng(2).integers(1, 256, (3, 60, 80), dtype=np.uint8)
    source = make_raster("img.tif", image)
    t = UTM_TRANSFORM
    bounds = (t.c + 20 * t.a, t.f + 50 * t.e, t.c + 45 * t.a, t.f + 20 * t.e)
    out = tmp_path / "part.tif"
    options = PredictOptions(32, 16, bounds=bounds)
    runtime = StandIn(pixelwise)
    predict_raster(runtime, source, out, options)
    part, meta = read(out)
    assert part.shape == (1, 30, 25)
    assert meta["transform"] == rasterio.windows.transform(Window(20, 20, 25, 30), t)
    expected = pixelwise(image[np.newaxis, :, 20:50, 20:45] / np.float32(255))[0].argmax(0)
    np.testing.assert_array_equal(part[0], expected)
    # Windows start 16 px (half the overlap, 8, rounded to the 16-px feature grid) before
    # the part: real pixels, not reflections.
    np.testing.assert_allclose(runtime.batches[0][0] * 255, image[:, 4:36, 4:36], atol=1e-4)
    np.testing.assert_allclose(runtime.batches[0][1] * 255, image[:, 4:36, 20:52], atol=1e-4)


# --- a real SCG-Net checkpoint through the CLI ---------------------------------------------


def run(args: list[str]) -> object:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_batch_size_does_not_change_the_result(scene, tmp_path):
    # The window engine (test_shared checks the shared one). Seed 10 predicts two classes on
    # this scene with top-2 margins >= 3e-5, far above the ~1e-6 that batch size changes in
    # float32 convolutions.
    checkpoint = save_tiny_checkpoint(tmp_path / "varied.pt", seed=10)
    outs = []
    for batch in (1, 7):
        out = tmp_path / f"b{batch}.tif"
        result = run([
            "-q", "predict", str(scene["image"]), "-m", str(checkpoint), "-o", str(out),
            "--stride", "20", "--batch-size", str(batch), "--probabilities",
            "--probability-dtype", "float32", "--tta", "--engine", "window",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [
            str(out),
            str(tmp_path / f"b{batch}_probabilities.tif"),
        ]
        outs.append((read(out)[0], read(tmp_path / f"b{batch}_probabilities.tif")[0]))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5)
    with rasterio.open(scene["image"]) as src:
        nodata = src.dataset_mask() == 0
    assert nodata[:10, :12].all()  # the scene's nodata corner
    np.testing.assert_array_equal(outs[0][0][0] == 255, nodata)
    counts = np.bincount(outs[0][0][0][~nodata], minlength=3)
    assert counts.sum() == (~nodata).sum() and np.sort(counts)[-2] > 500  # two classes at least
    # the class map (argmax of the weighted sums) is the argmax of the blended probabilities
    np.testing.assert_array_equal(outs[0][0][0][~nodata], outs[0][1].argmax(axis=0)[~nodata])


@pytest.mark.parametrize(
    ("crs", "transform"),
    [
        (UTM_CRS, UTM_TRANSFORM),
        (CRS.from_epsg(4326), from_origin(-77.05, 38.91, 2.7e-6, 2.7e-6)),
        (CRS.from_wkt(ALBERS_WKT), from_origin(1_612_345.0, 1_987_654.0, 30.0, 30.0)),
    ],
    ids=["utm", "wgs84", "albers-wkt"],
)
def test_output_keeps_georeferencing_nodata_and_colours(make_raster, tiny_checkpoint, tmp_path,
                                                        monkeypatch, crs, transform):  # fmt: skip
    image = np.random.default_rng(3).integers(1, 256, (3, 45, 61), dtype=np.uint8)
    image[:, :, :7] = 0  # collar
    image[:, -4:, :] = 0
    source = make_raster("scene.tif", image, crs=crs, transform=transform, nodata=0)
    monkeypatch.chdir(tmp_path)
    tta = ["--stride", "32", "--tta", "d4"] if crs == UTM_CRS else []  # fast: 4 windows
    result = run(["-q", "predict", str(source), "--model", str(tiny_checkpoint), *tta])
    assert result.exit_code == 0, result.output
    out = tmp_path / "scene_pred.tif"
    assert result.output.strip() == str(out)
    classes, meta = read(out)
    with rasterio.open(source) as src:
        assert meta["crs"] == src.crs
        assert meta["crs"].to_epsg() == src.crs.to_epsg()
        assert meta["crs"].to_dict() == src.crs.to_dict()
        assert meta["transform"] == src.transform
    assert classes.shape == (1, 45, 61) and meta["dtype"] == "uint8" and meta["nodata"] == 255
    collar = (image == 0).all(axis=0)
    np.testing.assert_array_equal(classes[0] == 255, collar)
    assert meta["colormap"][1] == (40, 215, 128, 255)
    assert meta["colormap"][255] == (0, 0, 0, 0)
    assert meta["descriptions"] == ("class",)
    tags = meta["tags"]
    assert json.loads(tags["CLASSES"]) == {"0": "class_0", "1": "class_1", "2": "class_2"}
    assert (tags["WINDOW"], tags["STRIDE"]) == ("32", "32" if tta else "16")
    assert tags["TTA"] == ("d4" if tta else "none")
    assert len(tags["MODEL_HASH"]) == 16 and tags["GEOSEG_VERSION"]
    with rasterio.open(out) as ds:
        assert ds.profile["tiled"] and ds.compression.name == "deflate"


def test_cog_and_vector_outputs(make_raster, tmp_path, monkeypatch):
    image = np.full((3, 70, 90), 40, dtype=np.uint8)
    image[0] = 200
    image[:2, 10:50, 20:75] = [[[40]], [[200]]]  # a class-1 rectangle over many windows
    image[:, :6, :] = 0  # nodata strip
    source = make_raster("rect.tif", image, nodata=0)
    engine = StandIn(lambda b: softmax(8 * b[:, :2]), num_classes=2)
    monkeypatch.setattr("geoseg_cli.inference.load_runtime", lambda path, device: engine)
    out, vector = tmp_path / "rect_cog.tif", tmp_path / "rect.geojson"
    result = run([
        "-q", "predict", str(source), "-m", "stand-in.pt", "-o", str(out), "--cog",
        "--co", "BLOCKSIZE=32", "--vector", str(vector), "--window", "32",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.overviews(1)[0] == 2
        assert ds.colormap(1)[1] == (1, 2, 3, 255) and ds.tags()["TTA"] == "none"
        assert ds.crs == UTM_CRS and ds.transform == UTM_TRANSFORM
    collection = json.loads(vector.read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32618"
    features = collection["features"]
    # One polygon per class, merged across window borders; nodata gives none.
    assert sorted(f["properties"]["class_id"] for f in features) == [0, 1]
    rect = next(f for f in features if f["properties"]["class_id"] == 1)
    xs, ys = zip(*rect["geometry"]["coordinates"][0], strict=True)
    assert (min(xs), max(xs)) == (UTM_TRANSFORM.c + 10, UTM_TRANSFORM.c + 37.5)
    assert (max(ys), min(ys)) == (UTM_TRANSFORM.f - 5, UTM_TRANSFORM.f - 25)

    # GeoPackage and FlatGeobuf (pyogrio): the same polygons, attributes and CRS.
    import pyogrio.raw

    for suffix in (".gpkg", ".fgb", ".shp"):
        target = tmp_path / f"rect{suffix}"
        assert write_class_polygons(out, target, engine.info.classes) == len(features)
        meta, _, wkb, (ids, names) = pyogrio.raw.read(target)
        assert CRS.from_user_input(meta["crs"]) == UTM_CRS
        assert meta["fields"].tolist() == ["class_id", "class"]
        got = {int(i): (n, shapely.from_wkb(g)) for i, n, g in zip(ids, names, wkb, strict=True)}
        for f in features:
            name, geometry = got[f["properties"]["class_id"]]
            assert name == f["properties"]["class"]
            assert geometry.equals(shapely.geometry.shape(f["geometry"]))
    # A Shapefile written by predict comes with its sidecar files, moved in from the
    # temporary folder with it.
    shapefile = tmp_path / "shp" / "rect.shp"
    shapefile.parent.mkdir()
    result = run([
        "-q", "predict", str(source), "-m", "stand-in.pt", "-o", str(tmp_path / "shp" / "r.tif"),
        "--vector", str(shapefile), "--window", "32",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in shapefile.parent.iterdir()} >= {
        "r.tif",
        "rect.shp",
        "rect.shx",
        "rect.dbf",
        "rect.prj",
    }
    assert not [p for p in shapefile.parent.iterdir() if p.name.startswith(".")]
    assert pyogrio.raw.read(shapefile)[0]["crs"] is not None


def test_many_inputs_into_folder_and_torchrun_sharding(scene, tiny_checkpoint, tmp_path,
                                                       monkeypatch):  # fmt: skip
    second = tmp_path / "second.tif"
    second.write_bytes(scene["image"].read_bytes())
    outdir = tmp_path / "out"
    outdir.mkdir()
    args = ["-q", "predict", str(scene["image"]), str(second), "-m", str(tiny_checkpoint),
            "-o", f"{outdir}/", "--stride", "32"]  # fmt: skip
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run(args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [str(outdir / "second_pred.tif")]
    assert sorted(p.name for p in outdir.iterdir()) == ["second_pred.tif"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    result = run([*args, "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in outdir.iterdir()) == ["scene_pred.tif", "second_pred.tif"]
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["input"], r["output"]) for r in records] == [
        (str(scene["image"]), str(outdir / "scene_pred.tif")),
        (str(second), str(outdir / "second_pred.tif")),
    ]
    # 67×93 px, window 32, stride 32: 3 × 3 windows, none of them nodata only
    assert [(r["windows"], r["skipped"], r["probabilities"]) for r in records] == [(9, 0, None)] * 2
    np.testing.assert_array_equal(read(outdir / "scene_pred.tif")[0],
                                  read(outdir / "second_pred.tif")[0])  # fmt: skip


def test_output_paths_rules(tmp_path):
    assert output_paths(["a/x.tif"], None) == [Path.cwd() / "x_pred.tif"]
    assert output_paths(["s3://b/y.tif?v=1"], tmp_path) == [tmp_path / "y_pred.tif"]
    with pytest.raises(Exception, match="existing folder"):
        output_paths(["a.tif", "b.tif"], tmp_path / "one.tif")
    with pytest.raises(Exception, match="same file name"):
        output_paths(["a/x.tif", "b/x.tif"], tmp_path)
