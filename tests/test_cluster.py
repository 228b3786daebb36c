"""geoseg cluster: the SGSeg network's parts, training on a scene, streamed cluster maps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from conftest import UTM_CRS, UTM_TRANSFORM, synthetic_scene, write_raster

from geoseg_cli.classes import ClassInfo, ClassTable, load_classes, write_classes_file
from geoseg_cli.cli import cli
from geoseg_cli.cluster import (
    ClusterOptions,
    cluster_classes,
    cluster_colors,
    cluster_raster,
)
from geoseg_cli.cluster_train import kmeans
from geoseg_cli.errors import InputError, OutputError, UsageError
from models.sgseg import (
    SGSegNet,
    cell_size,
    knn_graph,
    mutual_information,
    pool_cells,
    unpool_cells,
)

#: Options small enough for a test: a few 32-px windows, one epoch.
TINY = {"window": 32, "superpixels": 16, "epochs": 1, "train_windows": 4, "batch_size": 4}


@pytest.fixture
def image(tmp_path):
    """A 3-band uint8 UTM scene, 45×70 px (not multiples of the window), nodata 0 in a corner."""
    data, _ = synthetic_scene(45, 70, seed=5)
    data[:, :9, :13] = 0
    return write_raster(tmp_path / "scene.tif", data, nodata=0)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile, ds.colormap(1), ds.tags()


# --- network parts ---------------------------------------------------------------------------


def test_pool_and_unpool_are_adjoint_and_assignments_sum_to_one():
    torch.manual_seed(0)
    assignment = torch.softmax(torch.randn(2, 9, 12, 20), dim=1)
    values, cells = torch.randn(2, 5, 12, 20), torch.randn(2, 5, 3, 5)
    pooled = (pool_cells(assignment, values, 4) * cells).sum()
    assert pooled.item() == pytest.approx(
        (values * unpool_cells(assignment, cells, 4)).sum().item(), rel=1e-4
    )
    net = SGSegNet(3, 4, cell=3).eval()
    x = torch.randn(1, 3, 24, 36)
    features = net.encoder(x)
    bands = torch.nn.functional.avg_pool2d(x, 2)
    q = net._assignment(torch.cat([features, bands], 1), 4, 6)
    assert torch.allclose(q.sum(1), torch.ones(1, 12, 18))
    # every pixel's mass lands on existing cells: the masses add up to the pixel count
    mass = pool_cells(q, torch.ones(1, 1, 12, 18), 3)
    assert mass.sum().item() == pytest.approx(12 * 18, rel=1e-5)
    # pixels of the top-left cell never join a cell above or left of the grid
    assert q[0, :3, :3, :3].abs().max().item() == 0.0


def test_knn_graph_is_symmetric_without_self_loops():
    nodes = torch.randn(2, 10, 4)
    graph = knn_graph(nodes, 3)
    a = graph.adjacency
    assert torch.equal(a, a.transpose(1, 2))
    assert a.diagonal(dim1=1, dim2=2).abs().max().item() == 0
    assert (a.sum(-1) >= 3).all() and set(a.unique().tolist()) == {0.0, 1.0}


def test_mutual_information_bounds_and_the_prior():
    labels = torch.arange(4).repeat_interleave(16).view(1, 8, 8)
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    objective, mi = mutual_information(one_hot, one_hot, valid)
    assert mi.item() == pytest.approx(math.log(4), rel=1e-5) and objective.item() == mi.item()
    uniform = torch.full_like(one_hot, 0.25)
    assert mutual_information(one_hot, uniform, valid)[1].item() == pytest.approx(0.0, abs=1e-6)
    # invalid pixels do not count: only cluster 0 is left, no information
    only_first = valid & (labels == 0)
    assert mutual_information(one_hot, one_hot, only_first)[1].item() == pytest.approx(
        0.0, abs=1e-5
    )
    # a uniform prior subtracts log K; the true sizes as prior leave −H(Z|Z') = 0
    flat = torch.full((4,), 0.25)
    objective, mi = mutual_information(one_hot, one_hot, valid, flat)
    assert objective.item() == pytest.approx(mi.item() - math.log(4), abs=1e-5)
    skewed = torch.nn.functional.one_hot((labels > 0).long(), 4).permute(0, 3, 1, 2).float()
    sizes = torch.tensor([0.25, 0.75, 1e-9, 1e-9])
    objective, mi = mutual_information(skewed, skewed, valid, sizes)
    assert objective.item() == pytest.approx(0.0, abs=1e-4)
    assert mi.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-4)
    # under a skewed prior, the skewed partition beats the balanced one
    assert objective.item() > mutual_information(one_hot, one_hot, valid, sizes)[0].item()


def test_network_output_is_batch_independent_and_cropped():
    torch.manual_seed(1)
    net = SGSegNet(2, 5, cell=cell_size(32, 16)).eval()
    x = torch.randn(3, 2, 30, 38)
    with torch.no_grad():
        together = net(x)
        alone = net(x[1:2])
    assert together.shape == (3, 5, 30, 38)
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    out = net.train()(x)
    assert out.superpixel_error.shape == (3, 15, 19)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.superpixel_error).all()


def test_init_clusters_makes_the_classifier_a_nearest_centre_rule():
    torch.manual_seed(2)
    net = SGSegNet(3, 4, cell=2, width=8).eval()
    centres = torch.randn(4, 8)
    net.init_clusters(centres, temperature=3.0)
    embeddings = torch.randn(50, 8)
    logits = net.classify(embeddings[:, :, None, None])[:, :, 0, 0]
    nearest = torch.cdist(embeddings, centres).argmin(1)
    assert torch.equal(logits.argmax(1), nearest)
    # the logits are −τ‖e − c‖² up to a per-pixel constant
    gap = logits + 3.0 * torch.cdist(embeddings, centres) ** 2
    assert torch.allclose(gap - gap[:, :1], torch.zeros_like(gap), atol=1e-3)


def test_kmeans_finds_separated_blobs():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.1, (40, 2)) for c in ((0, 0), (5, 5), (0, 5))])
    centres, labels = kmeans(blobs, 3, np.random.default_rng(1))
    assert sorted(np.bincount(labels).tolist()) == [40, 40, 40]
    assert sorted(np.round(centres).astype(int).tolist()) == [[0, 0], [0, 5], [5, 5]]


# --- geoseg cluster --------------------------------------------------------------------------


def test_same_seed_same_clusters(image, tmp_path):
    a = cluster_raster(image, tmp_path / "a.tif", ClusterOptions(clusters=3, seed=4, **TINY))
    b = cluster_raster(image, tmp_path / "b.tif", ClusterOptions(clusters=3, seed=4, **TINY))
    c = cluster_raster(image, tmp_path / "c.tif", ClusterOptions(clusters=3, seed=5, **TINY))
    map_a, _, _, tags_a = _read(a.output)
    map_b, _, _, tags_b = _read(b.output)
    _, _, _, tags_c = _read(c.output)
    assert np.array_equal(map_a, map_b)
    assert a.loss == b.loss and a.mutual_information == b.mutual_information
    assert tags_a["MODEL_HASH"] == tags_b["MODEL_HASH"] != tags_c["MODEL_HASH"]


def test_cluster_map_keeps_grid_and_nodata_with_colour_table_and_tags(image, tmp_path):
    result = cluster_raster(image, tmp_path / "clusters.tif", ClusterOptions(clusters=4, **TINY))
    data, profile, colormap, tags = _read(result.output)
    assert profile["crs"] == UTM_CRS and profile["transform"] == UTM_TRANSFORM
    assert (profile["width"], profile["height"]) == (70, 45)
    assert profile["dtype"] == "uint8" and profile["nodata"] == 255
    assert profile["compress"] == "deflate" and profile["tiled"]
    nodata = np.zeros((45, 70), dtype=bool)
    nodata[:9, :13] = True
    assert np.array_equal(data == 255, nodata)
    assert data[~nodata].max() < 4
    assert [colormap[i][:3] for i in range(4)] == cluster_colors(4)
    assert colormap[255] == (0, 0, 0, 0)
    assert json.loads(tags["CLASSES"]) == {str(i): f"cluster_{i}" for i in range(4)}
    assert tags["MODEL"] == "sgseg/cnn" and tags["WINDOW"] == "32" and tags["STRIDE"] == "16"
    assert result.train_windows == 4 and result.windows > 0
    assert 0 <= result.mutual_information <= math.log(4) + 1e-6


def test_classes_out_round_trips_through_the_classes_loader(image, tmp_path):
    classes_out = tmp_path / "classes.toml"
    options = ClusterOptions(clusters=3, classes_out=classes_out, **TINY)
    result = cluster_raster(image, tmp_path / "clusters.tif", options)
    assert result.classes_out == classes_out
    _, _, colormap, _ = _read(result.output)
    as_json = write_classes_file(tmp_path / "classes.json", ClassTable(cluster_classes(3)))
    for path in (classes_out, as_json):
        table = load_classes(path)
        assert table.names == ["cluster_0", "cluster_1", "cluster_2"]
        assert [c.color for c in table.classes] == [colormap[i][:3] for i in range(3)]
        assert [c.value for c in table.classes] == [0, 1, 2] and table.ignore_index == 255
        assert table.map_values(np.array([0, 2, 255])).tolist() == [0, 2, 255]
    # raw label values, quotes in names and another ignore index survive the round trip
    valued = ClassTable([ClassInfo('say "hi"', (1, 2, 3), 10), ClassInfo("b", (4, 5, 6), 20)], 7)
    for suffix in (".toml", ".json"):
        path = write_classes_file(tmp_path / f"valued{suffix}", valued, ["a comment"])
        back = load_classes(path)
        assert back.classes == valued.classes and back.ignore_index == 7
        assert back.map_values(np.array([20, 10, 7])).tolist() == [1, 0, 7]
    assert (tmp_path / "valued.toml").read_text().startswith("# a comment\nignore_index = 7\n")


def test_a_raster_smaller_than_the_window_and_an_explicit_nodata(tmp_path):
    data, _ = synthetic_scene(20, 23, seed=2)
    data[:, -4:, :] = 7  # nodata only by --nodata 7
    path = write_raster(tmp_path / "small.tif", data)
    options = ClusterOptions(clusters=2, nodata=7, **TINY)
    result = cluster_raster(path, tmp_path / "small_clusters.tif", options)
    out, profile, _, _ = _read(result.output)
    assert out.shape == (20, 23) and profile["transform"] == UTM_TRANSFORM
    assert (out[-4:] == 255).all() and (out[:-4] < 2).all()


def test_bad_input_and_options_are_refused_before_training(image, tmp_path):
    blank = write_raster(tmp_path / "blank.tif", np.zeros((3, 30, 30), np.uint8), nodata=0)
    with pytest.raises(InputError, match="every pixel is nodata"):
        cluster_raster(blank, tmp_path / "out.tif", ClusterOptions(**TINY))
    with pytest.raises(UsageError, match="--superpixels 999"):
        cluster_raster(image, tmp_path / "out.tif", ClusterOptions(**{**TINY, "superpixels": 999}))
    with pytest.raises(UsageError, match="multiple of 2"):
        cluster_raster(image, tmp_path / "out.tif", ClusterOptions(**{**TINY, "window": 41}))
    with pytest.raises(UsageError, match=r"\.toml or \.json"):
        cluster_raster(image, tmp_path / "out.tif", ClusterOptions(classes_out=tmp_path / "c.txt"))
    (tmp_path / "taken.tif").write_bytes(b"")
    with pytest.raises(OutputError, match="--overwrite"):
        cluster_raster(image, tmp_path / "taken.tif", ClusterOptions(**TINY))
    assert not (tmp_path / "out.tif").exists()


def test_cli_cluster_then_evaluate_with_matching(image, tmp_path):
    out, classes = tmp_path / "clusters.tif", tmp_path / "classes.toml"
    args = ["cluster", str(image), "-k", "3", "-o", str(out), "--classes-out", str(classes)]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(cli, [*args, "--seed", "2", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["output"] == str(out) and record["classes_out"] == str(classes)
    assert record["clusters"] == 3 and record["epochs"] == 1
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    # the cluster map scored against itself as labels: every cluster matches itself
    labels = tmp_path / "labels.tif"
    data, _, _, _ = _read(out)
    write_raster(labels, data, nodata=255)
    scored = CliRunner().invoke(
        cli, ["evaluate", str(out), str(labels), "--match", "hungarian", "--json"]
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["oa"] == 1.0
