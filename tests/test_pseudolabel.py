"""Graph propagation and geoseg pseudolabel: sparse cell graphs, WSGCN-style GCN, outputs."""

from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from conftest import UTM_TRANSFORM, coarse_scene, write_chips

from geoseg_cli.chips import read_manifest
from geoseg_cli.cli import cli
from geoseg_cli.errors import InputError
from geoseg_cli.pixel_graph import KNN, NEIGHBOURS, build_graph, search_offsets
from geoseg_cli.pseudolabel import PseudolabelConfig, node_seeds, pseudolabel
from geoseg_cli.train import TrainConfig, train
from models.wsgcn import GraphBatch, PropagationConfig, propagate

IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_thread")


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
        "recipe": "paper",  # Dice, one pass over the chips per epoch
    }
    with pytest.raises(InputError, match=r"sparse labels .*--loss partial.*geoseg pseudolabel"):
        train(TrainConfig(chips, tmp_path / "dice", **settings))
    result = CliRunner().invoke(cli, ["train", str(chips), "-o", str(tmp_path / "cli")])
    # no --backbone-weights: the scratch recipe, whose Dice + CE needs dense labels too
    assert result.exit_code == 1 and "--loss dice+ce needs dense ones" in result.output
    result = train(TrainConfig(chips, tmp_path / "partial", loss="partial", **settings))
    assert np.isfinite(result.history[0]["train_loss"])
    logger = logging.getLogger("geoseg_cli")
    logger.addHandler(caplog.handler)  # the CLI stops geoseg_cli propagating
    try:
        train(TrainConfig(chips, tmp_path / "ce", loss="ce", **settings))
    finally:
        logger.removeHandler(caplog.handler)
    assert "plain cross-entropy learns from the labelled pixels only" in caplog.text
