"""geoseg evaluate: streamed scoring of class-map rasters (library and CLI)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from conftest import write_raster
from rasterio.transform import from_origin
from test_metrics import HAND_CONFUSION, LABELS, PRED

from geoseg_cli.cli import cli
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.evaluate import evaluate, resolve_classes
from geoseg_cli.metrics import ConfusionMatrix, boundary_mask


@pytest.fixture
def hand_rasters(tmp_path):
    """The hand example of test_metrics as rasters; PRED's 255 is its nodata."""
    return (
        write_raster(tmp_path / "pred.tif", PRED.astype(np.uint8), nodata=255),
        write_raster(tmp_path / "labels.tif", LABELS.astype(np.uint8)),
    )


def test_cli_json_matches_hand_computation(hand_rasters):
    pred, labels = hand_rasters
    args = ["evaluate", str(pred), str(labels), "--classes", "a,b,c"]
    result = CliRunner().invoke(cli, [*args, "--exclude-from-mean", "c", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["confusion_matrix"] == HAND_CONFUSION
    assert d["pixels"] == 11 and d["unpredicted"] == 1
    assert d["oa"] == pytest.approx(7 / 11)
    assert d["mf1"] == pytest.approx((6 / 8 + 6 / 9) / 2)
    assert d["miou"] == pytest.approx((3 / 5 + 3 / 6) / 2)
    assert [c["name"] for c in d["classes"]] == ["a", "b", "c"]
    assert d["classes"][1]["recall"] == pytest.approx(3 / 5)
    assert d["excluded_from_mean"] == ["c"]


def test_cli_table_output(hand_rasters):
    pred, labels = hand_rasters
    result = CliRunner().invoke(cli, ["evaluate", str(pred), str(labels), "--classes", "3"])
    assert result.exit_code == 0, result.output
    assert "class_1" in result.stdout
    assert "OA 0.6364" in result.stdout and "1 without prediction" in result.stdout


def test_streamed_erosion_equals_whole_raster(tmp_path):
    """Strips of 5 rows with R=3 must erode exactly as one whole-array computation."""
    rng = np.random.default_rng(7)
    labels = np.kron(rng.integers(0, 4, size=(9, 8)), np.ones((5, 4), dtype=np.int64))[:43, :29]
    labels[rng.random(labels.shape) < 0.03] = 255
    pred = np.where(rng.random(labels.shape) < 0.8, labels, rng.integers(0, 4, labels.shape))
    pred[labels == 255] = 0
    write_raster(tmp_path / "p.tif", pred.astype(np.uint8))
    write_raster(tmp_path / "l.tif", labels.astype(np.uint8))
    streamed = evaluate(
        tmp_path / "p.tif", tmp_path / "l.tif", num_classes=4, boundary_erosion=3, block_rows=5
    )
    whole = ConfusionMatrix(4)
    whole.update(pred, labels, mask=~boundary_mask(labels, 3))
    np.testing.assert_array_equal(streamed.confusion, whole.counts[:, :4])
    uneroded = evaluate(tmp_path / "p.tif", tmp_path / "l.tif", num_classes=4, block_rows=5)
    assert streamed.pixels < uneroded.pixels == int((labels != 255).sum())
    assert streamed.oa > uneroded.oa  # errors were placed at random, erosion removes some
    assert streamed.boundary_erosion == 3


def test_label_nodata_is_not_scored_and_classes_come_from_pred_tags(tmp_path, caplog):
    labels = np.array([[0, 1, 9], [1, 1, 0]], dtype=np.uint8)  # 9 is the label nodata
    pred = np.array([[0, 1, 1], [0, 1, 0]], dtype=np.uint8)
    write_raster(tmp_path / "l.tif", labels, nodata=9)
    path = write_raster(tmp_path / "p.tif", pred)
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(CLASSES=json.dumps({"0": "ground", "1": "roof"}))
    m = evaluate(path, tmp_path / "l.tif")
    assert m.classes == ["ground", "roof"]
    assert m.confusion.tolist() == [[2, 0], [1, 2]]
    assert "1 px (16.7%) have the raster's nodata value 9 and are ignored" in caplog.text
    assert "-unsetnodata" in caplog.text and "ignore index" not in caplog.text


def test_grid_mismatch_is_an_error(tmp_path, hand_rasters):
    pred, _ = hand_rasters
    shifted = from_origin(583_000.5, 4_507_000.0, 0.5, 0.5)  # one pixel east
    labels = write_raster(tmp_path / "shifted.tif", LABELS.astype(np.uint8), transform=shifted)
    with pytest.raises(InputError, match="not on the same grid"):
        evaluate(pred, labels)
    result = CliRunner().invoke(cli, ["evaluate", str(pred), str(labels)])
    assert result.exit_code == 1
    assert "not on the same grid" in result.output and "Traceback" not in result.output


def test_label_outside_classes_and_bad_options(hand_rasters, tmp_path):
    pred, labels = hand_rasters
    image = write_raster(tmp_path / "image.tif", np.stack([PRED.astype(np.uint8)] * 3))
    with pytest.raises(InputError, match=r"image\.tif has 3 bands, not a class map"):
        evaluate(image, labels)
    with pytest.raises(InputError, match=r"label values \[2\] are outside the 2 classes"):
        evaluate(pred, labels, num_classes=2)
    with pytest.raises(UsageError, match="no such class"):
        evaluate(pred, labels, classes=["a", "b", "c"], exclude_from_mean=["clutter"])
    with pytest.raises(UsageError, match="ignore index 1 is a class id"):
        evaluate(pred, labels, num_classes=3, ignore_index=1)


def test_classes_from_a_classes_file(tmp_path, hand_rasters):
    pred, labels = hand_rasters
    classes = tmp_path / "classes.toml"
    classes.write_text(
        'ignore_index = 255\n[[classes]]\nname = "x"\n[[classes]]\nname = "y"\n'
        '[[classes]]\nname = "z"\n'
    )
    args = ["evaluate", str(pred), str(labels), "--classes", str(classes), "--json"]
    result = CliRunner().invoke(cli, [*args, "--exclude-from-mean", "2"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [c["name"] for c in d["classes"]] == ["x", "y", "z"]
    assert d["excluded_from_mean"] == ["z"]


def _confusion(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> list[list[int]]:
    """Reference × prediction pixel counts, computed directly."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.ravel(), pred.ravel()), 1)
    return matrix.tolist()


def test_rgb_labels_are_mapped_through_the_isprs_preset(tmp_path):
    """ISPRS ground truth is colour-coded: band 1 alone is not the class id."""
    from geoseg_cli.classes import load_classes

    colors = np.array([c.color for c in load_classes("isprs").classes], dtype=np.uint8)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, size=(23, 31))
    pred = np.where(rng.random(ids.shape) < 0.8, ids, rng.integers(0, 6, ids.shape))
    write_raster(tmp_path / "gt.tif", colors[ids].transpose(2, 0, 1))
    write_raster(tmp_path / "pred.tif", pred.astype(np.uint8))
    args = ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.tif")]
    result = CliRunner().invoke(cli, [*args, "--classes", "isprs", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["confusion_matrix"] == _confusion(ids, pred, 6)
    assert d["oa"] == pytest.approx(float(np.mean(ids == pred)))
    assert d["classes"][1]["name"] == "building"

    result = CliRunner().invoke(cli, args)  # without the colours
    assert result.exit_code == 2
    assert "gt.tif has 3 bands" in result.output and "--classes" in result.output

    rgb = colors[ids].transpose(2, 0, 1).copy()
    rgb[:, 0, 0] = (10, 20, 30)  # a colour the preset does not know
    write_raster(tmp_path / "odd.tif", rgb)
    odd = ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "odd.tif"), "--classes", "isprs"]
    result = CliRunner().invoke(cli, odd)
    assert result.exit_code == 1
    assert "(10,20,30)" in result.output and "Traceback" not in result.output


def test_raw_label_values_are_mapped_through_a_classes_file(tmp_path, caplog):
    """A 0/255 road mask scored with the classes file that tiled it (road: value 255)."""
    mask = np.zeros((19, 27), dtype=np.uint8)
    mask[5:9, :] = 255
    mask[:, 20:22] = 255
    pred = (mask == 255).astype(np.uint8)
    pred[5, :10] = 0  # ten road pixels missed
    write_raster(tmp_path / "mask.tif", mask)
    write_raster(tmp_path / "pred.tif", pred)
    classes = tmp_path / "roads.toml"
    classes.write_text(
        'ignore_index = 255\n[[classes]]\nname = "background"\n'
        '[[classes]]\nname = "road"\nvalue = 255\n'
    )
    roads = int((mask == 255).sum())
    with caplog.at_level(logging.WARNING):  # without: the roads are the ignore index
        m = evaluate(tmp_path / "pred.tif", tmp_path / "mask.tif")
    assert m.pixels == mask.size - roads
    assert f"{roads} px ({100 * roads / mask.size:.1f}%) have value 255, the ignore index" in (
        caplog.text
    )
    caplog.clear()
    table = resolve_classes(str(classes))
    m = evaluate(tmp_path / "pred.tif", tmp_path / "mask.tif", classes=table)
    assert m.classes == ["background", "road"]
    assert m.confusion.tolist() == [[mask.size - roads, 0], [10, roads - 10]]
    assert caplog.text == ""


def test_checkpoint_classes_map_colours_and_values(tmp_path, tiny_checkpoint):
    """--classes best.pt: class i is label value i, or the checkpoint's colour of class i."""
    from geoseg_cli.checkpoint import load_checkpoint

    table = resolve_classes(str(tiny_checkpoint), ignore_index=200)
    assert table.names == ["class_0", "class_1", "class_2"] and table.ignore_index == 200
    colors = np.array([c.color for c in load_checkpoint(tiny_checkpoint).classes], np.uint8)
    ids = np.random.default_rng(5).integers(0, 3, size=(9, 14))
    pred = np.roll(ids, 1, axis=1)
    write_raster(tmp_path / "pred.tif", pred.astype(np.uint8))
    write_raster(tmp_path / "rgb.tif", colors[ids].transpose(2, 0, 1))
    write_raster(tmp_path / "ids.tif", ids.astype(np.uint8))
    for labels in ("rgb.tif", "ids.tif"):
        m = evaluate(tmp_path / "pred.tif", tmp_path / labels, classes=table)
        assert m.confusion.tolist() == _confusion(ids, pred, 3)


def test_polygon_labels_are_rasterised_on_the_prediction_grid(tmp_path):
    """Lon/lat polygons with a class-name attribute, scored against a UTM class map.

    The same confusion matrix as the polygons burnt on the map's grid by hand.
    """
    from conftest import UTM_CRS, UTM_TRANSFORM, write_geojson
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    def box(col0, row0, col1, row1):
        corners = [(col0, row0), (col1, row0), (col1, row1), (col0, row1), (col0, row0)]
        return {"type": "Polygon", "coordinates": [[UTM_TRANSFORM * c for c in corners]]}

    utm = [(box(3, 4, 20, 15), "house"), (box(12, 10, 30, 21), "pool")]
    lonlat = [(transform_geom(UTM_CRS, "EPSG:4326", g), {"kind": k}) for g, k in utm]
    vectors = write_geojson(tmp_path / "ref.geojson", lonlat, "urn:ogc:def:crs:OGC:1.3:CRS84")
    ids = {"background": 0, "house": 1, "pool": 2}
    reference = rasterize(
        [(g, ids[k]) for g, k in utm], out_shape=(25, 33), transform=UTM_TRANSFORM
    )
    pred = np.roll(reference, 2, axis=1)
    write_raster(tmp_path / "pred.tif", pred.astype(np.uint8))

    m = evaluate(tmp_path / "pred.tif", vectors, class_field="kind")
    assert m.classes == ["background", "house", "pool"]
    assert m.confusion.tolist() == _confusion(reference, pred, 3)
    write_raster(tmp_path / "binary.tif", (pred > 0).astype(np.uint8))
    args = ["evaluate", str(tmp_path / "binary.tif"), str(vectors), "--class-value", "1", "--json"]
    result = CliRunner().invoke(cli, args)  # every polygon one class
    assert result.exit_code == 0, result.output
    binary = _confusion((reference > 0).astype(np.int64), (pred > 0).astype(np.int64), 2)
    assert json.loads(result.stdout)["confusion_matrix"] == binary
    bad = CliRunner().invoke(cli, [*args[:3], "--class-field", "colour"])
    assert bad.exit_code == 1 and "no feature has attribute 'colour'" in bad.output


def test_present_only_averages_the_classes_of_the_reference(tmp_path):
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=np.uint8)  # no class 2
    pred = np.array([[0, 2, 1, 1], [0, 0, 1, 0]], dtype=np.uint8)  # one false class 2
    write_raster(tmp_path / "l.tif", labels)
    write_raster(tmp_path / "p.tif", pred)
    every = evaluate(tmp_path / "p.tif", tmp_path / "l.tif", num_classes=3)
    iou = [3 / 5, 3 / 4, 0.0]
    assert every.iou.tolist() == pytest.approx(iou) and every.miou == pytest.approx(sum(iou) / 3)
    args = ["evaluate", str(tmp_path / "p.tif"), str(tmp_path / "l.tif"), "--classes", "a,b,c"]
    result = CliRunner().invoke(cli, [*args, "--present-only", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["miou"] == pytest.approx((3 / 5 + 3 / 4) / 2)
    assert d["mf1"] == pytest.approx((6 / 8 + 6 / 7) / 2)
    assert d["excluded_from_mean"] == ["c"] and d["classes"][2]["iou"] == 0.0


def test_ignored_labels_under_prediction_nodata_do_not_warn(tmp_path, caplog):
    labels = np.array([[255, 255, 0], [1, 1, 0]], dtype=np.uint8)
    pred = np.array([[9, 9, 0], [1, 0, 0]], dtype=np.uint8)  # 9: nodata (image nodata)
    write_raster(tmp_path / "l.tif", labels)
    write_raster(tmp_path / "p.tif", pred, nodata=9)
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        m = evaluate(tmp_path / "p.tif", tmp_path / "l.tif", num_classes=2)
    assert m.pixels == 4 and "ignore index" not in caplog.text
    pred[0, 0] = 1  # now one ignored label pixel has a prediction: it is worth a warning
    write_raster(tmp_path / "p2.tif", pred, nodata=9)
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        evaluate(tmp_path / "p2.tif", tmp_path / "l.tif", num_classes=2)
    assert "1 px (16.7%) have value 255, the ignore index, and are ignored" in caplog.text
