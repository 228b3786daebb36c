"""geoseg tile: chips, manifest and stats from class-index, palette and vector labels."""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from conftest import UTM_CRS, UTM_TRANSFORM, synthetic_scene, write_geojson
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg_cli.classes import PRESETS, load_classes
from geoseg_cli.cli import cli
from geoseg_cli.cli.tile import expand_variadic_option
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.tiling import grid_offsets, tile

ISPRS_COLORS = np.array([c["color"] for c in PRESETS["isprs"]["classes"]], dtype=np.uint8)


def read_manifest(outdir: Path) -> list[dict[str, str]]:
    with open(outdir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def mosaic_labels(outdir: Path, shape: tuple[int, int], fill: int = 254) -> np.ndarray:
    """Paste every label chip back at its window (``fill`` where no chip lies)."""
    out = np.full(shape, fill, dtype=np.int64)
    for row in read_manifest(outdir):
        r, c = int(row["row_off"]), int(row["col_off"])
        with rasterio.open(outdir / row["label"]) as lab:
            out[r : r + lab.height, c : c + lab.width] = lab.read(1)
    return out


def window_of(row: dict[str, str]) -> Window:
    return Window(int(row["col_off"]), int(row["row_off"]), int(row["width"]), int(row["height"]))


def utm_box(col0: float, row0: float, col1: float, row1: float) -> dict:
    """A polygon given in pixel edges of the UTM test grid, as GeoJSON in UTM metres."""
    corners = [(col0, row0), (col1, row0), (col1, row1), (col0, row1), (col0, row0)]
    return {"type": "Polygon", "coordinates": [[UTM_TRANSFORM @ c for c in corners]]}


def test_grid_offsets_shift_the_last_window_inside() -> None:
    assert grid_offsets(93, 32, 32) == [0, 32, 61]
    assert grid_offsets(93, 32, 20) == [0, 20, 40, 60, 61]
    assert grid_offsets(64, 32, 32) == [0, 32]
    assert grid_offsets(32, 32, 7) == [0]


def test_index_labels_chips_manifest_and_stats(scene: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "chips"
    summary = tile(
        [scene["image"]], [scene["labels"]], out, size=32, val_fraction=0.25, seed=1, split="random"
    )

    rows = read_manifest(out)
    assert list(rows[0]) == [
        "chip_id", "image", "label", "source", "col_off", "row_off", "width", "height", "split",
        "nodata_fraction", "count_class_0", "count_class_1", "count_class_2",
    ]  # fmt: skip
    # 67×93 with 32 px chips: rows 0, 32, 35 × cols 0, 32, 61 (edge windows shifted inside).
    assert sorted((int(r["row_off"]), int(r["col_off"])) for r in rows) == [
        (r, c) for r in (0, 32, 35) for c in (0, 32, 61)
    ]
    assert [r["split"] for r in rows].count("val") == 2  # round(0.25 · 9)
    assert summary.num_chips == {"train": 7, "val": 2}
    with rasterio.open(scene["image"]) as src, rasterio.open(scene["labels"]) as lab_src:
        valid_all = src.dataset_mask() > 0
        image_all, labels_all = src.read(), lab_src.read(1)
        wkt = src.crs.to_wkt()
    assert not valid_all[:10, :12].any()
    train_pixels, train_counts = [], np.zeros(3, dtype=np.int64)
    for row in rows:
        window = window_of(row)
        sl = window.toslices()
        expected_labels = np.where(valid_all[sl], labels_all[sl], 255)
        with rasterio.open(out / row["image"]) as img, rasterio.open(out / row["label"]) as lab:
            assert img.crs == UTM_CRS and lab.crs == UTM_CRS
            assert img.transform == window_transform(window, UTM_TRANSFORM) == lab.transform
            assert (img.count, img.dtypes[0], img.nodata) == (3, "uint8", 0)
            assert (lab.count, lab.dtypes[0], lab.nodata) == (1, "uint8", 255)
            np.testing.assert_array_equal(img.read(), image_all[(slice(None), *sl)])
            np.testing.assert_array_equal(lab.read(1), expected_labels)
            assert lab.colormap(1)[1][:3] != lab.colormap(1)[2][:3]
        counts = np.bincount(expected_labels[expected_labels != 255], minlength=3)
        assert [int(row[f"count_class_{i}"]) for i in range(3)] == counts.tolist()
        assert float(row["nodata_fraction"]) == pytest.approx(1 - valid_all[sl].mean(), abs=1e-6)
        if row["split"] == "train":
            train_pixels.append(image_all[(slice(None), *sl)][:, valid_all[sl]] / 255)
            train_counts += counts
    assert float(rows[0]["nodata_fraction"]) == pytest.approx(120 / 1024, abs=1e-6)

    stats = json.loads((out / "stats.json").read_text())
    pixels = np.concatenate(train_pixels, axis=1)
    freq = train_counts / train_counts.sum()
    assert stats["format_version"] == 1
    assert (stats["bands"], stats["dtype"], stats["nodata"]) == ([1, 2, 3], "uint8", 0)
    assert stats["scale"] == pytest.approx(1 / 255)
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=1), rtol=1e-8)
    assert stats["resolution"] == 0.5 and stats["crs"] == wkt
    assert [c["name"] for c in stats["classes"]] == ["class_0", "class_1", "class_2"]
    assert stats["ignore_index"] == 255
    assert stats["class_counts"] == train_counts.tolist() == summary.class_counts
    np.testing.assert_allclose(stats["class_frequencies"], freq)
    np.testing.assert_allclose(stats["class_weights"], np.median(freq) / freq)
    assert (stats["size"], stats["stride"]) == (32, 32)
    assert stats["num_chips"] == {"train": 7, "val": 2}


def test_uint16_scaling_nodata_skipping_and_overlap(make_raster, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(1, 3000, size=(2, 67, 45), dtype=np.uint16)
    image[:, :40] = 0  # nodata
    labels = rng.integers(0, 2, size=(67, 45), dtype=np.uint8)
    out = tmp_path / "chips"
    summary = tile(
        [make_raster("u16.tif", image, nodata=0)],
        [make_raster("lab.tif", labels)],
        out,
        size=32,
        stride=20,
        bidx=[2],
        max_nodata=0.3,
        val_fraction=0,
    )
    rows = read_manifest(out)
    # Rows 0, 20, 35 × cols 0, 13: rows 0 and 20 are ≥ 62 % nodata and skipped.
    assert [(int(r["row_off"]), int(r["col_off"])) for r in rows] == [(35, 0), (35, 13)]
    assert summary.skipped == 4
    assert {r["nodata_fraction"] for r in rows} == {str(5 / 32)}
    with rasterio.open(out / rows[0]["image"]) as img, rasterio.open(out / rows[0]["label"]) as lab:
        assert (img.count, img.dtypes[0], img.nodata) == (1, "uint16", 0)
        np.testing.assert_array_equal(img.read(1), image[1, 35:67, 0:32])
        expected = np.where(image[1, 35:67, 0:32] > 0, labels[35:67, 0:32], 255)
        np.testing.assert_array_equal(lab.read(1), expected)
    stats = json.loads((out / "stats.json").read_text())
    # Stats cover chip pixels: the 19 columns both chips share count twice.
    valid = np.concatenate([image[1, 40:67, 0:32], image[1, 40:67, 13:45]], axis=1) / 10000
    assert stats["scale"] == 1e-4 and stats["dtype"] == "uint16" and stats["bands"] == [2]
    np.testing.assert_allclose(stats["mean"], [valid.mean()], rtol=1e-10)
    np.testing.assert_allclose(stats["std"], [valid.std()], rtol=1e-8)
    assert stats["num_chips"] == {"train": 2, "val": 0}


def test_alpha_band_masks_the_image_and_is_not_an_input(tmp_path: Path) -> None:
    image, labels = synthetic_scene(40, 50)
    alpha = np.full((1, 40, 50), 255, np.uint8)
    alpha[0, :, :20] = 0  # transparent left part, image values kept as they are
    path = tmp_path / "rgba.tif"
    profile = {"driver": "GTiff", "width": 50, "height": 40, "count": 4, "dtype": "uint8",
               "crs": UTM_CRS, "transform": UTM_TRANSFORM}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate([image, alpha]))
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    out = tmp_path / "chips"
    label_path = tmp_path / "lab.tif"
    with rasterio.open(label_path, "w", **{**profile, "count": 1}) as dst:
        dst.write(labels, 1)
    tile([path], [label_path], out, size=32, stride=18, val_fraction=0, max_nodata=1)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["bands"] == [1, 2, 3]
    rows = read_manifest(out)
    assert [float(r["nodata_fraction"]) for r in rows] == [20 / 32, 2 / 32, 20 / 32, 2 / 32]
    with rasterio.open(out / rows[0]["image"]) as img, rasterio.open(out / rows[0]["label"]) as lab:
        assert img.count == 3
        expected = labels[:32, :32].copy()
        expected[:, :20] = 255
        np.testing.assert_array_equal(lab.read(1), expected)


def test_mask_labels_with_nodata_zero_warn_that_the_background_is_dropped(
    scene, make_raster, tmp_path, caplog
) -> None:
    mask = np.zeros((67, 93), np.uint8)
    mask[20:40, 30:60] = 1  # a 0/1 building mask saved with nodata 0
    labels = make_raster("mask.tif", mask, nodata=0)
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        tile([scene["image"]], [labels], tmp_path / "chips", size=32)
    # the label nodata pixels where the image has data: not under its 10×12 nodata corner
    dropped, with_data = mask.size - 600 - 120, mask.size - 120
    assert f"{dropped} px ({100 * dropped / with_data:.1f}%) have the raster's nodata value 0" in (
        caplog.text
    )
    stats = json.loads((tmp_path / "chips" / "stats.json").read_text())
    assert stats["class_counts"][0] == 0
    assert "class(es) class_0 have no pixel in the chips" in caplog.text


def test_float_labels_with_nan_nodata(scene, make_raster, tmp_path: Path) -> None:
    labels = np.zeros((67, 93), np.float32)
    labels[:, 50:] = 2.0
    labels[:8, :8] = np.nan  # nodata corner
    path = make_raster("float_labels.tif", labels, nodata=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "invalid value ... in cast"
        tile([scene["image"]], [path], tmp_path / "chips", size=32)
    stats = json.loads((tmp_path / "chips" / "stats.json").read_text())
    # class counts over the chips' label pixels (the image's nodata corner aside): 0 and 2
    assert stats["class_counts"][1] == 0 and min(stats["class_counts"][::2]) > 0
    with rasterio.open(tmp_path / "chips" / "labels" / "scene_00000_00000.tif") as ds:
        first = ds.read(1)
    # NaN corner (and the image's 10×12 nodata corner) ignored, class 0 elsewhere
    assert (first[:8, :8] == 255).all() and set(np.unique(first[10:, 12:])) == {0}

    labels[:8, :8] = 0.5
    fractions = make_raster("fractions.tif", labels)
    with pytest.raises(InputError, match=r"fractions\.tif: class-index labels must be whole"):
        tile([scene["image"]], [fractions], tmp_path / "chips2", size=32)
    labels[:8, :8] = np.nan  # NaN without a nodata value: not a label either
    unmarked = make_raster("unmarked.tif", labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tile([scene["image"]], [unmarked], tmp_path / "chips3", size=32)
    with rasterio.open(tmp_path / "chips3" / "labels" / "scene_00000_00000.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), first)


def test_rgb_palette_labels_with_isprs_preset(make_raster, tmp_path: Path) -> None:
    image, ids = synthetic_scene(40, 50, num_classes=6, seed=2)
    rgb = ISPRS_COLORS[ids].transpose(2, 0, 1).copy()
    rgb[:, 5, :] = 0  # eroded-boundary black → ignore
    out = tmp_path / "chips"
    tile([make_raster("img.tif", image)], [make_raster("gt.tif", rgb)], out, size=25,
         classes="isprs", split="random")  # fmt: skip
    expected = ids.astype(np.int64)
    expected[5, :] = 255
    np.testing.assert_array_equal(mosaic_labels(out, ids.shape), expected)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"][1] == {"name": "building", "color": [0, 0, 255]}
    assert len(stats["classes"]) == 6


def test_unknown_palette_colours_are_listed_with_counts(make_raster, tmp_path: Path) -> None:
    image, ids = synthetic_scene(40, 50, num_classes=6)
    rgb = ISPRS_COLORS[ids].transpose(2, 0, 1).copy()
    rgb[:, 0, :5] = np.array([1, 2, 3])[:, None]
    rgb[:, 1, :2] = 9
    with pytest.raises(InputError, match=r"2 colour\(s\).*\(1,2,3\) \(5 px\), \(9,9,9\) \(2 px\)"):
        tile([make_raster("img.tif", image)], [make_raster("gt.tif", rgb)], tmp_path / "out",
             size=25, classes="isprs")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_classes_file_maps_values_and_sets_ignore(make_raster, tmp_path, suffix) -> None:
    doc = {"ignore_index": 200, "classes": [{"name": "background"},
           {"name": "road", "color": [255, 0, 0], "value": 255}]}  # fmt: skip
    classes = tmp_path / f"classes{suffix}"
    if suffix == ".json":
        classes.write_text(json.dumps(doc))
    else:
        classes.write_text(
            'ignore_index = 200\n[[classes]]\nname = "background"\n'
            '[[classes]]\nname = "road"\ncolor = [255, 0, 0]\nvalue = 255\n'
        )
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20] = 255
    image = np.full((1, 40, 40), 7, dtype=np.uint8)
    image[0, :, :3] = 0
    out = tmp_path / "chips"
    tile([make_raster("img.tif", image, nodata=0)], [make_raster("road.tif", mask)], out,
         size=40, classes=classes)  # fmt: skip
    expected = np.where(mask == 255, 1, 0)
    expected[:, :3] = 200
    np.testing.assert_array_equal(mosaic_labels(out, (40, 40)), expected)
    with rasterio.open(out / "labels" / "img_00000_00000.tif") as lab:
        assert lab.nodata == 200
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == [
        {"name": "background", "color": [0, 0, 0]},
        {"name": "road", "color": [255, 0, 0]},
    ]
    assert stats["ignore_index"] == 200 and stats["class_counts"] == [1110, 370]


def test_bad_classes_file_and_uint16_labels(scene, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": [{"name": "a", "colour": [1, 2, 3]}]}))
    with pytest.raises(InputError, match=r"bad.json: class 0: unknown key\(s\) colour"):
        load_classes(bad)
    table = load_classes("isprs", ignore_index=300)
    assert table.dtype == "uint16" and table.ignore_index == 300
    out = tmp_path / "chips"
    tile([scene["image"]], [scene["labels"]], out, size=32, ignore_index=300)
    with rasterio.open(out / "labels" / "scene_00000_00000.tif") as lab:
        assert (lab.dtypes[0], lab.nodata) == ("uint16", 300)
        assert (lab.read(1)[:10, :12] == 300).all()


def test_random_chips_are_seeded_and_split_by_fraction(scene, tmp_path: Path) -> None:
    def windows(out: Path) -> list[tuple[int, int, str]]:
        return [(int(r["col_off"]), int(r["row_off"]), r["split"]) for r in read_manifest(out)]

    runs = {"a": 5, "b": 5, "c": 6}
    options = {"size": 20, "count": 10, "split": "random"}
    images, labels = [scene["image"]], [scene["labels"]]
    a, _, _ = (tile(images, labels, tmp_path / n, seed=seed, **options) for n, seed in runs.items())
    assert windows(tmp_path / "a") == windows(tmp_path / "b") != windows(tmp_path / "c")
    assert a.num_chips == {"train": 8, "val": 2} and a.sampling == "random"
    cols_rows = {(c, r) for c, r, _ in windows(tmp_path / "a")}
    assert len(cols_rows) == 10 and all(c <= 73 and r <= 47 for c, r in cols_rows)
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["stride"] is None


def test_split_by_source_and_cli_json(scene, make_raster, tmp_path: Path) -> None:
    image2, labels2 = synthetic_scene(40, 64, seed=9)
    img2, lab2 = make_raster("second.tif", image2), make_raster("second_labels.tif", labels2)
    out = tmp_path / "chips"
    args = ["tile", str(scene["image"]), str(img2), "--labels", str(scene["labels"]), str(lab2),
            "-o", str(out), "--size", "32", "--val-fraction", "0.5", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["split"] == "source"
    rows = read_manifest(out)
    by_source = {
        r["source"]: {x["split"] for x in rows if x["source"] == r["source"]} for r in rows
    }
    assert sorted(map(sorted, by_source.values())) == [["train"], ["val"]]
    assert summary["num_chips"] == {
        "train": sum(r["split"] == "train" for r in rows),
        "val": sum(r["split"] == "val" for r in rows),
    }
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0


def test_split_by_source_follows_the_chip_share(make_raster, tmp_path, caplog) -> None:
    # one large image (24 chips of 32 px) and four small ones (1 chip each): by image count
    # 20 % validation would be one image, maybe the large one (86 % of the chips)
    big_image, big_labels = synthetic_scene(128, 192, seed=1)
    images, labels = [make_raster("big.tif", big_image)], [make_raster("big_l.tif", big_labels)]
    for i in range(4):
        image, label = synthetic_scene(32, 32, seed=10 + i)
        images.append(make_raster(f"small{i}.tif", image))
        labels.append(make_raster(f"small{i}_l.tif", label))
    for seed in range(4):
        out = tmp_path / f"chips{seed}"
        tile(images, labels, out, size=32, val_fraction=0.2, seed=seed, split="source")
        rows = read_manifest(out)
        val = [r for r in rows if r["split"] == "val"]
        assert len(rows) == 28 and {Path(r["source"]).name for r in val} <= {
            f"small{i}.tif" for i in range(4)
        }
        assert 1 <= len(val) <= 4  # nearest 20 % of 28 chips without the big image

    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        tile(images[:2], labels[:2], tmp_path / "two", size=32, split="source")
    assert "the 1 validation image(s) hold 4% of the chips (--val-fraction 0.2)" in caplog.text
    assert [r["source"] for r in read_manifest(tmp_path / "two") if r["split"] == "val"] == [
        str(images[1])
    ]


def test_expand_variadic_labels() -> None:
    args = ["a.tif", "b.tif", "--labels", "la.tif", "lb.tif", "-o", "out", "--json"]
    assert expand_variadic_option(args, "--labels") == [
        "a.tif", "b.tif", "--labels", "la.tif", "--labels", "lb.tif", "-o", "out", "--json",
    ]  # fmt: skip
    assert expand_variadic_option(["--labels", "x", "--", "-y"], "--labels") == [
        "--labels", "x", "--", "-y",
    ]  # fmt: skip


@pytest.fixture
def bad_inputs(scene, make_raster, tmp_path: Path) -> dict[str, Path]:
    image, labels = synthetic_scene(67, 93)
    labels[30, 40] = 7
    shifted = from_origin(583_000.5, 4_507_000.0, 0.5, 0.5)
    vectors = write_geojson(tmp_path / "v.geojson", [(utm_box(0, 0, 5, 5), {"kind": "a"})])
    (tmp_path / "three.json").write_text(json.dumps({"classes": [{"name": n} for n in "abc"]}))
    (tmp_path / "broken.tif").write_text("not a raster")
    return {
        **scene,
        "shifted": make_raster("shifted.tif", labels, transform=shifted),
        "other_crs": make_raster("other_crs.tif", labels, crs="EPSG:32617"),
        "sevens": make_raster("sevens.tif", labels),
        "rgb": make_raster("rgb.tif", image),
        "empty": make_raster("empty.tif", np.zeros((1, 67, 93), np.uint8), nodata=0),
        "vectors": vectors,
        "three": tmp_path / "three.json",
        "broken": tmp_path / "broken.tif",
    }


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        (("image", "shifted"), 1, r"shifted.tif \(EPSG:32618.*origin \(583000.5.*scene.tif"),
        (("image", "other_crs"), 1, r"other_crs.tif \(EPSG:32617.*\(EPSG:32618.*gdalwarp"),
        (("image", "sevens", "--classes", "three"), 1, r"label value\(s\) 7 \(1 px\) are not"),
        (("image", "vectors", "--class-field", "cls"), 1, r"no feature has attribute 'cls'.*kind"),
        (("image", "labels", "--size", "68"), 1, r"chip size 68 is larger than .*67 or less"),
        (("empty", "labels"), 1, r"empty.tif: every pixel is nodata"),
        (("broken", "labels"), 1, r"broken.tif: not a readable raster"),
        (("image", "rgb"), 2, r"rgb.tif holds RGB colours: pass --classes"),
        (("image", "labels", "--class-value", "2"), 2, r"apply to vector labels only"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(bad_inputs, tmp_path, case, code, message):
    image, labels, *rest = case
    out = tmp_path / "out"
    extra = [str(bad_inputs.get(x, x)) for x in rest]
    args = ["tile", str(bad_inputs[image]), "--labels", str(bad_inputs[labels]), "-o", str(out),
            "--size", "32", *extra]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "Traceback" not in result.output
    assert re.search(message, error[0]), error[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_library_usage_errors(scene, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="1 image"):
        tile([scene["image"]], [scene["labels"], scene["labels"]], tmp_path / "o", size=32)
    with pytest.raises(UsageError, match="--split source needs several images"):
        tile([scene["image"]], [scene["labels"]], tmp_path / "o", size=32, split="source")
