"""Hungarian matching of clusters to classes and geoseg evaluate --match hungarian."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from conftest import write_raster

from geoseg_cli.cli import cli
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.evaluate import evaluate
from geoseg_cli.matching import linear_assignment, match_clusters


def _brute_force(cost: np.ndarray) -> float:
    """Smallest total cost of a one-to-one assignment of min(n, m) pairs."""
    n, m = cost.shape
    if n <= m:
        return min(cost[range(n), list(p)].sum() for p in itertools.permutations(range(m), n))
    return min(cost[list(p), range(m)].sum() for p in itertools.permutations(range(n), m))


def test_linear_assignment_is_optimal_on_random_matrices():
    rng = np.random.default_rng(3)
    for trial in range(300):
        n, m = (int(v) for v in rng.integers(1, 6, size=2))
        # integer costs make ties, which must not break optimality
        cost = rng.integers(0, 4, (n, m)) if trial % 2 else rng.normal(size=(n, m))
        rows, cols = linear_assignment(cost)
        assert len(rows) == min(n, m)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert list(rows) == sorted(rows)
        assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost))


def test_linear_assignment_refuses_non_finite_costs():
    with pytest.raises(ValueError, match="finite"):
        linear_assignment(np.array([[0.0, np.inf]]))


def test_match_clusters_maximises_matched_pixels():
    # rows: classes, columns: clusters; the greedy pick (cluster 0 → class 0, 9 px) is not
    # the best: 0 → 1 and 1 → 0 match 8 + 7 = 15 px against 9 + 1 = 10
    contingency = np.array([[9, 7, 0], [8, 1, 0]])
    assert match_clusters(contingency).tolist() == [1, 0, -1]


@pytest.fixture
def permuted(tmp_path):
    """Labels with 3 classes and a cluster map of the same partition, ids permuted.

    The ids map 0 → 2, 1 → 0, 2 → 1; nodata 255 in the corner.
    """
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 3, (6, 7)), np.ones((5, 5), dtype=np.int64))[:29, :33]
    clusters = np.array([2, 0, 1])[labels].astype(np.uint8)
    return labels.astype(np.uint8), clusters


def test_hungarian_matching_scores_a_permuted_label_map_perfectly(tmp_path, permuted):
    labels, clusters = permuted
    label_path = write_raster(tmp_path / "labels.tif", labels)
    pred = write_raster(tmp_path / "clusters.tif", clusters, nodata=255)
    raw = evaluate(pred, label_path)
    assert raw.oa < 0.5  # the ids themselves agree only by chance
    matched = evaluate(pred, label_path, match="hungarian", classes=["a", "b", "c"])
    assert matched.oa == 1.0 and matched.miou == 1.0
    assert matched.cluster_classes == [1, 2, 0]
    assert matched.confusion.tolist() == np.diag(np.bincount(labels.ravel())).tolist()


def test_unmatched_clusters_count_as_errors(tmp_path, permuted):
    labels, clusters = permuted
    clusters = clusters.copy()
    clusters[:, :5] = 3  # a fourth cluster, inside every class
    label_path = write_raster(tmp_path / "labels.tif", labels)
    pred = write_raster(tmp_path / "clusters.tif", clusters, nodata=255)
    m = evaluate(pred, label_path, match="hungarian")
    assert m.classes == ["class_0", "class_1", "class_2"]
    assert m.cluster_classes[3] == -1 and m.cluster_pixels[3] == labels.shape[0] * 5
    assert m.oa == pytest.approx(1 - 5 / labels.shape[1])
    assert int(m.unpredicted.sum()) == labels.shape[0] * 5
    assert m.precision.tolist() == [1.0, 1.0, 1.0]  # nobody's false positive
    d = m.to_dict()
    assert d["match"]["clusters"][3] == {"cluster": "cluster_3", "class": None, "pixels": 145}


def test_fewer_clusters_than_classes_leave_a_class_unmatched(tmp_path, permuted):
    labels, _ = permuted
    clusters = np.where(labels == 2, 0, labels).astype(np.uint8)  # classes 0 and 2 merged
    label_path = write_raster(tmp_path / "labels.tif", labels)
    pred = write_raster(tmp_path / "clusters.tif", clusters, nodata=255)
    m = evaluate(pred, label_path, match="hungarian", num_classes=3)
    counts = np.bincount(labels.ravel(), minlength=3)
    assert m.oa == pytest.approx((counts[1] + counts[:3:2].max()) / counts.sum())
    assert np.nanmin(m.recall) == 0.0


def test_cluster_names_come_from_the_map_and_classes_from_the_labels(tmp_path, permuted):
    labels, clusters = permuted
    label_path = write_raster(tmp_path / "labels.tif", labels)
    pred = write_raster(tmp_path / "clusters.tif", clusters, nodata=255)
    with rasterio.open(pred, "r+") as dst:
        dst.update_tags(CLASSES=json.dumps({"0": "c0", "1": "c1", "2": "c2"}))
    result = CliRunner().invoke(
        cli, ["evaluate", str(pred), str(label_path), "--match", "hungarian", "--json"]
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["oa"] == 1.0
    assert [c["name"] for c in d["classes"]] == ["class_0", "class_1", "class_2"]
    assert [(c["cluster"], c["class"]) for c in d["match"]["clusters"]] == [
        ("c0", "class_1"),
        ("c1", "class_2"),
        ("c2", "class_0"),
    ]
    table = CliRunner().invoke(
        cli, ["evaluate", str(pred), str(label_path), "--match", "hungarian"]
    )
    assert "c0 -> class_1" in table.stdout and "OA 1.0000" in table.stdout


def test_match_refuses_labels_outside_the_classes_and_unknown_methods(tmp_path, permuted):
    labels, clusters = permuted
    label_path = write_raster(tmp_path / "labels.tif", labels)
    pred = write_raster(tmp_path / "clusters.tif", clusters, nodata=255)
    with pytest.raises(InputError, match=r"label values \[2\] are outside the 2 classes"):
        evaluate(pred, label_path, match="hungarian", classes=["a", "b"])
    with pytest.raises(UsageError, match="--match"):
        evaluate(pred, label_path, match="greedy")
