"""geoseg tile: the spatial blocks split and the warnings about splits and unscored labels."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_scene

from geoseg_cli.cli import cli
from geoseg_cli.errors import UsageError
from geoseg_cli.tiling import tile


def manifest(outdir: Path) -> list[dict[str, str]]:
    with open(outdir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def coverage(rows: list[dict[str, str]], split: str, shape: tuple[int, int]) -> np.ndarray:
    """Pixels covered by the chips of one split."""
    covered = np.zeros(shape, dtype=bool)
    for r in rows:
        if r["split"] == split:
            top, left = int(r["row_off"]), int(r["col_off"])
            covered[top : top + int(r["height"]), left : left + int(r["width"])] = True
    return covered


@pytest.fixture
def big_scene(make_raster) -> tuple[Path, Path]:
    image, labels = synthetic_scene(150, 210, seed=4)
    return make_raster("big.tif", image), make_raster("big_labels.tif", labels)


def test_blocks_split_keeps_train_and_val_pixels_apart(big_scene, tmp_path, caplog) -> None:
    image, labels = big_scene
    with caplog.at_level(logging.INFO, logger="geoseg_cli"):
        summary = tile([image], [labels], tmp_path / "a", size=32, stride=16, seed=2, block_size=64)
    rows = manifest(tmp_path / "a")
    assert summary.split == "blocks"  # the default for one image
    train, val = coverage(rows, "train", (150, 210)), coverage(rows, "val", (150, 210))
    assert val.any() and train.any() and not (train & val).any()
    # 150×210 with 32 px chips every 16 px: 9 × 13 grid windows, some left out at the borders
    assert len(rows) + summary.left_out == 9 * 13 and summary.left_out > 0
    assert 0.1 <= summary.num_chips["val"] / len(rows) <= 0.3  # near --val-fraction 0.2
    assert f"{summary.left_out} chip(s) that would overlap both sides were left out" in caplog.text
    assert len(list((tmp_path / "a" / "images").iterdir())) == len(rows)
    assert len(list((tmp_path / "a" / "labels").iterdir())) == len(rows)
    # seeded: the same seed gives the same split, another seed another one
    tile([image], [labels], tmp_path / "b", size=32, stride=16, seed=2, block_size=64)
    tile([image], [labels], tmp_path / "c", size=32, stride=16, seed=3, block_size=64)
    assert manifest(tmp_path / "b") == rows
    other = manifest(tmp_path / "c")
    assert other != rows
    train, val = coverage(other, "train", (150, 210)), coverage(other, "val", (150, 210))
    assert val.any() and not (train & val).any()


def test_default_block_size(big_scene, tmp_path, caplog) -> None:
    image, labels = big_scene
    with caplog.at_level(logging.INFO, logger="geoseg_cli"):
        tile([image], [labels], tmp_path / "a", size=32)  # 4 × 32 px: 2 × 2 blocks
        tile([image], [labels], tmp_path / "b", size=96)  # 4 × or 2 × 96 px: 1 or 2 blocks
    assert "split by 128 px blocks" in caplog.text
    assert "split by 96 px blocks" in caplog.text


def test_blocks_smaller_than_chips_are_refused(big_scene, tmp_path) -> None:
    image, labels = big_scene
    with pytest.raises(UsageError, match="--block-size 24 is smaller than a chip"):
        tile([image], [labels], tmp_path / "o", size=32, block_size=24)
    assert not (tmp_path / "o").exists()


def test_random_split_with_overlap_warns(big_scene, tmp_path) -> None:
    image, labels = big_scene
    base = ["tile", str(image), "--labels", str(labels), "--size", "32", "--split", "random"]
    result = CliRunner().invoke(cli, [*base, "--stride", "16", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "validation chips share pixels with training chips (--stride 16 < --size 32)" in (
        result.output
    )
    assert "--split blocks (the default for one image)" in result.output
    result = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "b")])
    assert result.exit_code == 0 and "share pixels" not in result.output
    result = CliRunner().invoke(cli, [*base, "--count", "20", "-o", str(tmp_path / "c")])
    assert "(random chips overlap)" in result.output


def test_ignore_warning_skips_image_nodata(make_raster, tmp_path, caplog) -> None:
    image, labels = synthetic_scene(64, 64, seed=1)
    image[:, :16, :] = 0  # a nodata band along the top
    labels[:16, :] = 255  # unlabelled there, as expected: no warning
    image_path = make_raster("img.tif", image, nodata=0)
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        tile([image_path], [make_raster("lab.tif", labels)], tmp_path / "a", size=32)
    assert "the ignore index" not in caplog.text
    labels[40:42, :10] = 255  # 20 unlabelled pixels where the image has data
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        tile([image_path], [make_raster("lab2.tif", labels)], tmp_path / "b", size=32)
    assert "lab2.tif: 20 px (0.7%) have value 255, the ignore index, and are ignored" in (
        caplog.text
    )


def test_source_split_warnings_name_the_cause(make_raster, tmp_path, caplog) -> None:
    images, labels = [], []
    for i in range(2):  # two images alike: either one is half the chips
        image, label = synthetic_scene(64, 64, seed=i)
        images.append(make_raster(f"i{i}.tif", image))
        labels.append(make_raster(f"l{i}.tif", label))
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        tile(images, labels, tmp_path / "a", size=32)
    assert "hold 50% of the chips (--val-fraction 0.2): every image holds at least 50% of the " in (
        caplog.text
    )
    assert "too few images to split by image; use --split blocks or more images" in caplog.text
    # an image whose windows are all mostly nodata gives no chips: say so
    image, label = synthetic_scene(64, 64, seed=5)
    image[:, :, ::2] = 0
    image[:, ::2, :] = 0  # 75 % nodata in every window
    images[1] = make_raster("holes.tif", image, nodata=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        tile(images, labels, tmp_path / "b", size=32)
    assert f"only {images[0]} gave chips ({images[1]} gave none: too much nodata)" in caplog.text
