"""Sparse labels: tile --sparse buffering and the partial loss."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from conftest import (
    UTM_TRANSFORM,
    synthetic_scene,
    write_geojson,
    write_raster,
)

from geoseg_cli.chips import load_stats
from geoseg_cli.cli import cli
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.evaluate import evaluate
from geoseg_cli.tiling import tile
from models import SegmentationLoss
from models.partial import entropy, grid_smoothness, masked_mean, pixel_offsets

IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_thread")


def _xy(col: float, row: float) -> list[float]:
    """Map coordinates of pixel position (col, row) of the UTM test grid."""
    return list(UTM_TRANSFORM * (col, row))


def _point(col: float, row: float) -> dict:
    return {"type": "Point", "coordinates": _xy(col, row)}


def _line(*cols_rows: tuple[float, float]) -> dict:
    return {"type": "LineString", "coordinates": [_xy(c, r) for c, r in cols_rows]}


def _square(col0: float, row0: float, col1: float, row1: float) -> dict:
    corners = [(col0, row0), (col1, row0), (col1, row1), (col0, row1), (col0, row0)]
    return {"type": "Polygon", "coordinates": [[_xy(c, r) for c, r in corners]]}


def _classes_file(path: Path, names: list[str]) -> Path:
    path.write_text(json.dumps({"classes": [{"name": n} for n in names]}))
    return path


def _labels(out: Path, shape: tuple[int, int]) -> np.ndarray:
    """Label chips pasted back at their windows (254 where no chip lies)."""
    mosaic = np.full(shape, 254, dtype=np.int64)
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        r, c = int(row["row_off"]), int(row["col_off"])
        with rasterio.open(out / row["label"]) as src:
            mosaic[r : r + src.height, c : c + src.width] = src.read(1)
    return mosaic


def _disc(shape: tuple[int, int], col: float, row: float, radius: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` of (col, row)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (cols + 0.5 - col) ** 2 + (rows + 0.5 - row) ** 2 <= radius**2


SHAPE = (64, 64)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    picture, _ = synthetic_scene(*SHAPE)
    return write_raster(tmp_path / "image.tif", picture)


def test_points_lines_and_polygons_are_burnt_with_pixel_buffers(image, tmp_path) -> None:
    """Default buffers: 2 px around points, 1 px around lines; polygons whole.

    Everything else is ignore, although the classes file has a "background" class.
    """
    features = [
        (_point(10.5, 10.5), {"cls": "tree"}),  # at a pixel centre
        (_point(30.0, 10.0), {"cls": "tree"}),  # at a pixel corner
        (_line((40.5, 5.5), (60.5, 5.5)), {"cls": "road"}),  # along pixel centres
        (_line((40.2, 20.3), (55.7, 35.9)), {"cls": "road"}),  # diagonal
        (_square(5, 30, 15, 40), {"cls": "house"}),
    ]
    vectors = write_geojson(tmp_path / "sparse.geojson", features)
    classes = _classes_file(tmp_path / "classes.json", ["background", "tree", "road", "house"])
    out = tmp_path / "chips"
    summary = tile(
        [image],
        [vectors],
        out,
        size=64,
        val_fraction=0,
        classes=classes,
        class_field="cls",
        sparse=True,
    )
    labels = _labels(out, SHAPE)

    # The diagonal: the pixels whose centre lies within 1 px of it (the pixels it crosses
    # have their centre within √½ px), to the 0.5 % of the buffer's polygon approximation.
    cols, rows = np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5)
    start, end = np.array([40.2, 20.3]), np.array([55.7, 35.9])
    step = end - start
    t = ((cols - start[0]) * step[0] + (rows - start[1]) * step[1]) / (step**2).sum()
    t = np.clip(t, 0, 1)
    distance = np.hypot(cols - start[0] - t * step[0], rows - start[1] - t * step[1])
    assert (labels[distance <= 1] == 2).all()
    assert (labels[(distance > 1.01) & (distance < 3)] == IGNORE).all()

    expected = np.full(SHAPE, IGNORE)
    assert _disc(SHAPE, 10.5, 10.5, 2).sum() == 13  # a point at a pixel centre
    expected[_disc(SHAPE, 10.5, 10.5, 2)] = 1
    assert _disc(SHAPE, 30.0, 10.0, 2).sum() == 12  # at a pixel corner
    expected[_disc(SHAPE, 30.0, 10.0, 2)] = 1
    expected[4:7, 40:61] = 2  # centres within 1 px of row 5.5, columns 40-60,
    expected[5, [39, 61]] = 2  # and of its end points
    expected[30:40, 5:15] = 3  # the polygon's interior
    elsewhere = distance >= 3
    np.testing.assert_array_equal(labels[elsewhere], expected[elsewhere])
    assert not (labels == 0).any()  # no "background" anywhere

    stats = json.loads((out / "stats.json").read_text())
    labelled = int((labels != IGNORE).sum())
    assert stats["sparse"] is True
    assert stats["coverage"] == pytest.approx(labelled / (64 * 64))
    assert stats["class_counts"] == [0, 25, int((labels == 2).sum()), 100]
    assert summary.sparse and summary.unlabelled == 0
    assert load_stats(out).sparse and load_stats(out).coverage == pytest.approx(stats["coverage"])


def test_buffer_option_replaces_both_buffers_and_own_pixels_win(image, tmp_path) -> None:
    """--buffer 0: only the touched pixels; --buffer 3 for points and lines alike.

    A later feature's buffer covers an earlier one's, but never another feature's own pixels.
    """
    features = [
        (_line((20.5, -10), (20.5, 80)), {"cls": 2}),  # vertical, column 20, image height
        (_point(22.5, 10.5), {"cls": 1}),  # its buffer reaches column 20
    ]
    vectors = write_geojson(tmp_path / "sparse.geojson", features)
    labels = {}
    for buffer in (0, 3):
        out = tmp_path / f"chips{buffer}"
        tile(
            [image],
            [vectors],
            out,
            size=64,
            val_fraction=0,
            class_field="cls",
            sparse=True,
            buffer=buffer,
        )
        labels[buffer] = _labels(out, SHAPE)
    assert (labels[0] == 2).sum() == 64 and (labels[0][:, 20] == 2).all()
    assert (labels[0] == 1).sum() == 1 and labels[0][10, 22] == 1
    disc = _disc(SHAPE, 22.5, 10.5, 3)
    strip = np.zeros(SHAPE, dtype=bool)
    strip[:, 17:24] = True  # centres within 3 px of column 20.5
    assert ((labels[3] == 1) == (disc & ~(np.arange(64) == 20)[None, :])).all()
    assert ((labels[3] == 2) == (strip & ~(labels[3] == 1))).all()
    assert (labels[3][:, 20] == 2).all()  # the line's own pixels are never overwritten
    stats = json.loads((tmp_path / "chips3" / "stats.json").read_text())
    # Numeric classes without a background fill: class 0 is a plain class, not background.
    assert [c["name"] for c in stats["classes"]] == ["class_0", "class_1", "class_2"]


def test_sparse_tiling_skips_and_counts_chips_without_labels(image, tmp_path) -> None:
    vectors = write_geojson(tmp_path / "sparse.geojson", [(_point(5.5, 5.5), {"cls": "tree"})])
    summary = tile(
        [image],
        [vectors],
        tmp_path / "chips",
        size=16,
        val_fraction=0,
        class_field="cls",
        sparse=True,
    )
    # 4×4 windows of 16 px, one holds the point.
    assert summary.unlabelled == 15 and sum(summary.num_chips.values()) == 1
    assert summary.classes == ["tree"]  # names found only: no "background" added
    assert summary.coverage == pytest.approx(13 / 256)
    with pytest.raises(InputError, match="no chip holds a labelled pixel"):
        far = write_geojson(tmp_path / "far.geojson", [(_point(500.5, 500.5), {"cls": "a"})])
        tile([image], [far], tmp_path / "none", size=16, class_field="cls", sparse=True)


def test_sparse_options_and_dense_refusal(image, tmp_path) -> None:
    vectors = write_geojson(tmp_path / "sparse.geojson", [(_point(5.5, 5.5), {"cls": 1})])
    with pytest.raises(UsageError, match="add --sparse"):
        tile([image], [vectors], tmp_path / "a", size=16, class_field="cls", buffer=2)
    labels = write_raster(tmp_path / "labels.tif", np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(UsageError, match="--buffer applies to vector labels"):
        tile([image], [labels], tmp_path / "b", size=16, sparse=True, buffer=2)
    # Without --sparse, points would be surrounded by background: refused with the fix.
    with pytest.raises(InputError, match=r"1 point or line feature.*geoseg tile --sparse"):
        tile([image], [vectors], tmp_path / "c", size=16, class_field="cls")
    prediction = write_raster(tmp_path / "pred.tif", np.ones(SHAPE, dtype=np.uint8))
    with pytest.raises(InputError, match="surrounded by 'background'"):
        evaluate(prediction, vectors, class_field="cls")
    result = CliRunner().invoke(
        cli,
        [
            "tile",
            str(image),
            "--labels",
            str(vectors),
            "--class-field",
            "cls",
            "--sparse",
            "--buffer",
            "1",
            "--size",
            "16",
            "--val-fraction",
            "0",
            "-o",
            str(tmp_path / "d"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sparse"] and summary["unlabelled"] == 15
    assert summary["coverage"] == pytest.approx(5 / 256)


def test_sparse_tiling_does_not_import_pytorch() -> None:
    code = (
        "import sys; import geoseg_cli.cli.tile, geoseg_cli.sparse, geoseg_cli.tiling; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- the partial loss -------------------------------------------------------------------


def test_entropy_and_smoothness_terms() -> None:
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]]).T.reshape(1, 2, 1, 2)
    h = entropy(logits)
    assert h[0, 0, 0].item() == pytest.approx(np.log(2))
    assert h[0, 0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(h, torch.tensor([[[True, False]]])).item() == pytest.approx(np.log(2))
    assert masked_mean(h, torch.zeros(1, 1, 2, dtype=torch.bool)).item() == 0
    assert pixel_offsets(2) == [(0, 1), (0, 2), (1, -1), (1, 0), (1, 1), (2, 0)]

    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 3.0  # a colour edge between columns 3 and 4
    probs = torch.zeros(1, 2, 8, 8)
    probs[:, 0, :, :4] = 1
    probs[:, 1, :, 4:] = 1
    along_edge = grid_smoothness(probs, image)
    probs_across = probs.roll(2, dims=-1)  # class change inside a uniform colour
    assert along_edge.item() < 1e-6 < grid_smoothness(probs_across, image).item()
    assert grid_smoothness(torch.full((1, 2, 8, 8), 0.5), image).item() == 0


def test_partial_loss_needs_the_image_and_ignores_unlabelled_pixels_in_ce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    image = torch.randn(2, 4, 16, 16)
    target = torch.full((2, 16, 16), IGNORE)
    target[:, 3, 3] = 1
    loss = SegmentationLoss("partial", ignore_index=IGNORE)
    with pytest.raises(ValueError, match="needs the input image"):
        loss(logits, target)
    out = loss(logits, target, image)
    assert set(out.parts) == {"ce", "entropy", "smooth", "total"}
    expected_ce = torch.nn.functional.cross_entropy(logits[:, :, 3, 3], target[:, 3, 3])
    assert out.parts["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    out.total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
