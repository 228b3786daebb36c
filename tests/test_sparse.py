"""Sparse labels: tile --sparse buffering, the partial loss, graph propagation, pseudolabel."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from conftest import (
    UTM_TRANSFORM,
    coarse_scene,
    synthetic_scene,
    write_chips,
    write_geojson,
    write_raster,
)

from geoseg_cli.chips import load_stats, read_manifest
from geoseg_cli.cli import cli
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.evaluate import evaluate
from geoseg_cli.pixel_graph import KNN, NEIGHBOURS, build_graph, search_offsets
from geoseg_cli.pseudolabel import PseudolabelConfig, node_seeds, pseudolabel
from geoseg_cli.tiling import tile
from geoseg_cli.train import TrainConfig, train
from models import SegmentationLoss
from models.partial import entropy, grid_smoothness, masked_mean, pixel_offsets
from models.wsgcn import GraphBatch, PropagationConfig, propagate

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


# --- graphs and propagation ---------------------------------------------------------------


def test_graph_of_a_1024_chip_is_sparse_and_memory_bounded() -> None:
    """A 1024² chip at the default 4-px cells: 65 536 nodes.

    Edges stay O(N·k) and the build's peak memory a small fraction of one dense N×N float32
    matrix (17 GB).
    """
    rng = np.random.default_rng(0)
    features = rng.normal(size=(256, 256, 5)).astype(np.float32)
    nodes = 256 * 256
    tracemalloc.start()
    graph = build_graph(features)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert graph.num_nodes == nodes
    assert graph.src.size <= (len(NEIGHBOURS) + 2 * KNN) * nodes
    assert graph.src.size >= len(NEIGHBOURS) * nodes * 0.95
    assert peak < 0.005 * nodes * nodes * 4  # < 86 MB
    assert graph.weight.min() > 0 and graph.weight.max() <= 1
    # Undirected: every edge appears both ways, with the same affinity.
    pairs = zip(graph.src.tolist(), graph.dst.tolist(), strict=True)
    forward = dict(zip(pairs, graph.weight.tolist(), strict=True))
    assert all(
        forward.get((d, s)) == pytest.approx(w) for (s, d), w in list(forward.items())[::997]
    )


def test_graph_edges_are_the_8_neighbours_and_the_nearest_candidates() -> None:
    """Node (4, 4) gets its 8 neighbours and the 2 candidates that share its value.

    The candidates (0, 6) and (8, 2) of its search window are unlike every other node.
    """
    features = np.full((9, 9, 1), 2.0, dtype=np.float32)
    features[4, 4] = features[0, 6] = features[8, 2] = 0.0
    graph = build_graph(features, k=2, radius=2, dilation=2)
    centre = 4 * 9 + 4
    out = graph.src == centre
    weights = dict(zip(graph.dst[out].tolist(), graph.weight[out].tolist(), strict=True))
    neighbours = {(4 + dy) * 9 + 4 + dx for dy, dx in NEIGHBOURS}
    assert neighbours | {6, 74} <= set(weights)
    assert weights[6] == weights[74] == 1.0
    assert all(weights[n] == pytest.approx(np.exp(-2.0)) for n in neighbours)
    assert (-4, 2) in search_offsets(2, 2) and (1, 1) not in search_offsets(2, 2)
    assert len(search_offsets(2, 2)) == 24


def test_propagation_follows_colour_and_is_batch_independent() -> None:
    """Two colour regions, one seed in each: each region gets its seed's class.

    A graph trained in a batch of two gives what it gives alone.
    """
    rows, cols = 12, 16
    colour = np.zeros((rows, cols, 1), dtype=np.float32)
    colour[:, 8:] = 4.0
    yy, xx = np.mgrid[0:rows, 0:cols]
    scaled = np.concatenate([colour / 0.5, np.stack([yy, xx], -1) / 4.0], -1).astype(np.float32)
    inputs = np.concatenate([colour, np.stack([yy, xx], -1) / 16.0], -1).astype(np.float32)
    graph = build_graph(scaled)
    seeds = np.full((rows, cols), -1)
    seeds[6, 2], seeds[6, 13] = 0, 1
    n = rows * cols

    def run(copies: int) -> torch.Tensor:
        batch = GraphBatch(
            torch.from_numpy(np.concatenate([graph.src + b * n for b in range(copies)])),
            torch.from_numpy(np.concatenate([graph.dst + b * n for b in range(copies)])),
            torch.from_numpy(np.concatenate([graph.weight] * copies)),
            copies,
            n,
        )
        return propagate(
            torch.from_numpy(np.stack([inputs.reshape(n, -1)] * copies)),
            batch,
            torch.from_numpy(np.stack([seeds.reshape(n)] * copies)),
            2,
            [torch.Generator().manual_seed(7) for _ in range(copies)],
            PropagationConfig(steps=150),
        )

    alone, pair = run(1), run(2)
    classes = alone[0].argmax(-1).reshape(rows, cols).numpy()
    assert (classes[:, :8] == 0).all() and (classes[:, 8:] == 1).all()
    torch.testing.assert_close(pair[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(pair[1], alone[0], rtol=0, atol=1e-5)


def test_node_seeds_take_the_most_frequent_class_of_a_cell() -> None:
    labels = np.full((6, 5), IGNORE, dtype=np.uint8)
    labels[0, 0], labels[0, 1], labels[1, 1] = 2, 1, 1
    labels[5, 4] = 0  # the bottom-right cell is padded (6×5 → 8×8 at 4 px)
    seeds = node_seeds(labels, 3, IGNORE, 4)
    assert seeds.tolist() == [[1, -1], [-1, 0]]


# --- geoseg pseudolabel -----------------------------------------------------------------


@pytest.fixture
def sparse_chips(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A sparse chips folder: 3 classes, 64-px chips, 12 train / 4 val, a nodata strip.

    Seeds lie in every class region of every chip but one, which has none.
    """
    image, dense = coarse_scene(256, 256, num_classes=3, seed=5)
    sparse = np.full(dense.shape, IGNORE, dtype=np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(160):
        r, c = int(rng.integers(2, 254)), int(rng.integers(2, 254))
        sparse[r - 1 : r + 2, c - 1 : c + 2] = dense[r, c]
    sparse[:64, 128:192] = IGNORE  # train chip (row 0, column 128): no labelled pixel
    sparse[100:104, :] = IGNORE  # nodata rows: labels ignore
    root = write_chips(tmp_path / "sparse", image, sparse, 64)
    for row in read_manifest(root):  # the nodata strip, as geoseg tile writes it
        with rasterio.open(row.image(root), "r+") as dst:
            if dst.transform.f == UTM_TRANSFORM.f - 64 * 0.5:
                mask = np.full((64, 64), 255, dtype=np.uint8)
                mask[36:40] = 0
                dst.write_mask(mask)
    stats = json.loads((root / "stats.json").read_text())
    stats["sparse"] = True
    stats["coverage"] = float((sparse != IGNORE).mean())
    (root / "stats.json").write_text(json.dumps(stats))
    return root, dense


def test_pseudolabels_keep_every_seed_skip_empty_chips_and_are_deterministic(
    sparse_chips, tmp_path
) -> None:
    chips, dense = sparse_chips
    config = PseudolabelConfig(
        device="cpu", confidence=0.6, batch_size=3, propagation=PropagationConfig(steps=60)
    )
    summary = pseudolabel(chips, tmp_path / "dense", config)
    assert summary.skipped == 1
    assert summary.num_chips == {"train": 11, "val": 4}
    rows = read_manifest(tmp_path / "dense")
    assert len(rows) == 15 and "scene_128_0" not in {r.chip_id for r in rows}
    source = {r.chip_id: r for r in read_manifest(chips)}
    correct = labelled = 0
    for row in rows:
        with rasterio.open(source[row.chip_id].label(chips)) as src:
            seeds = src.read(1)
        with rasterio.open(row.label(tmp_path / "dense")) as src:
            pseudo = src.read(1)
            assert src.crs is not None and src.nodata == IGNORE
            assert src.transform == rasterio.open(source[row.chip_id].label(chips)).transform
        with rasterio.open(row.image(tmp_path / "dense")) as src:
            valid = src.dataset_mask() > 0
        keep = seeds != IGNORE
        np.testing.assert_array_equal(pseudo[keep], seeds[keep])  # every seed kept
        assert (pseudo[~valid] == IGNORE).all()  # nodata stays unlabelled
        left, top = (int(v) for v in row.chip_id.split("_")[1:])
        truth = dense[top : top + 64, left : left + 64]
        scored = (pseudo != IGNORE) & valid
        correct += int((pseudo[scored] == truth[scored]).sum())
        labelled += int(scored.sum())
    assert labelled > 0.5 * 15 * 64 * 64  # most pixels get a label
    assert correct / labelled > 0.9  # and a right one

    stats = json.loads((tmp_path / "dense" / "stats.json").read_text())
    assert stats["sparse"] is False and stats["pseudolabel"]["skipped"] == 1
    assert stats["coverage"] > 0.5 > stats["pseudolabel"]["seed_coverage"]
    assert stats["mean"] == json.loads((chips / "stats.json").read_text())["mean"]
    assert sum(stats["class_counts"]) == int(stats["coverage"] * 11 * 64 * 64 + 0.5)

    config = PseudolabelConfig(
        device="cpu", confidence=0.6, batch_size=1, propagation=PropagationConfig(steps=60)
    )
    again = pseudolabel(chips, tmp_path / "again", config)
    assert again.class_counts == summary.class_counts  # same seed, other batching
    for row in rows:
        with (
            rasterio.open(row.label(tmp_path / "dense")) as a,
            rasterio.open(row.label(tmp_path / "again")) as b,
        ):
            np.testing.assert_array_equal(a.read(1), b.read(1))


def test_pseudolabel_cli_with_a_model_and_bad_input(sparse_chips, tmp_path) -> None:
    from conftest import save_tiny_checkpoint

    chips, _ = sparse_chips
    ckpt = save_tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "dense"
    args = [
        "pseudolabel",
        str(chips),
        "-o",
        str(out),
        "--model",
        str(ckpt),
        "--steps",
        "20",
        "--device",
        "cpu",
        "--json",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped"] == 1 and summary["classes"] == ["class_0", "class_1", "class_2"]
    assert json.loads((out / "stats.json").read_text())["pseudolabel"]["model"] == str(ckpt)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    wrong = save_tiny_checkpoint(tmp_path / "four.pt", in_channels=4)
    result = CliRunner().invoke(cli, [*args[:5], str(wrong), "--overwrite"])
    assert result.exit_code == 1 and "takes 4 band(s) but the chips have 3" in result.output


def test_train_refuses_dice_on_sparse_chips_and_trains_partial(sparse_chips, tmp_path, caplog):
    chips, _ = sparse_chips
    settings = {
        "backbone": "resnet18",
        "window": 32,
        "epochs": 1,
        "batch_size": 4,
        "workers": 0,
        "device": "cpu",
        "lr": 1e-3,
    }
    with pytest.raises(InputError, match=r"sparse labels .*--loss partial.*geoseg pseudolabel"):
        train(TrainConfig(chips, tmp_path / "dice", **settings))
    result = CliRunner().invoke(cli, ["train", str(chips), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 1 and "--loss dice needs dense ones" in result.output
    result = train(TrainConfig(chips, tmp_path / "partial", loss="partial", **settings))
    assert np.isfinite(result.history[0]["train_loss"])
    logger = logging.getLogger("geoseg_cli")
    logger.addHandler(caplog.handler)  # the CLI stops geoseg_cli propagating
    try:
        train(TrainConfig(chips, tmp_path / "ce", loss="ce", **settings))
    finally:
        logger.removeHandler(caplog.handler)
    assert "plain cross-entropy learns from the labelled pixels only" in caplog.text
