"""Metrics against hand-computed confusion matrices (ignore index, erosion, means)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg_cli.metrics import ConfusionMatrix, boundary_mask

# Reference and prediction of the hand example (255: ignore / no prediction).
LABELS = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 255, 1],
    ]
)
PRED = np.array(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 2],
        [2, 0, 0, 255],
    ]
)
# Counted pairs (reference, prediction): the label-255 pixel is skipped; the pred-255
# pixel is a class-1 pixel without prediction.
HAND_CONFUSION = [[3, 1, 0], [0, 3, 1], [1, 0, 1]]


def hand_metrics(exclude: list[int] | None = None):
    matrix = ConfusionMatrix(3, ignore_index=255)
    matrix.update(PRED, LABELS)
    return matrix.metrics(["a", "b", "c"], exclude or [])


def test_confusion_matrix_and_scores_match_hand_computation():
    m = hand_metrics()
    assert m.confusion.tolist() == HAND_CONFUSION
    assert m.unpredicted.tolist() == [0, 1, 0]
    assert m.pixels == 11
    assert m.oa == pytest.approx(7 / 11)
    # support (reference incl. unpredicted) 4, 5, 2; predicted 4, 4, 2; TP 3, 3, 1
    np.testing.assert_allclose(m.precision, [3 / 4, 3 / 4, 1 / 2])
    np.testing.assert_allclose(m.recall, [3 / 4, 3 / 5, 1 / 2])
    np.testing.assert_allclose(m.f1, [6 / 8, 6 / 9, 2 / 4])
    np.testing.assert_allclose(m.iou, [3 / 5, 3 / 6, 1 / 3])
    assert m.mf1 == pytest.approx((6 / 8 + 6 / 9 + 2 / 4) / 3)
    assert m.miou == pytest.approx((3 / 5 + 3 / 6 + 1 / 3) / 3)


def test_exclusion_from_mean_keeps_per_class_scores_and_oa():
    m = hand_metrics(exclude=[2])
    assert m.mf1 == pytest.approx((6 / 8 + 6 / 9) / 2)
    assert m.miou == pytest.approx((3 / 5 + 3 / 6) / 2)
    assert m.oa == pytest.approx(7 / 11)
    d = m.to_dict()
    assert d["excluded_from_mean"] == ["c"]
    assert d["classes"][2]["iou"] == pytest.approx(1 / 3)
    assert d["confusion_matrix"] == HAND_CONFUSION


def test_f1_is_harmonic_mean_of_precision_and_recall():
    m = hand_metrics()
    p, r = m.precision, m.recall
    np.testing.assert_allclose(m.f1, 2 * p * r / (p + r))


def test_absent_class_is_nan_and_left_out_but_false_positives_count():
    matrix = ConfusionMatrix(4, ignore_index=255)
    matrix.update(PRED, LABELS)
    m = matrix.metrics()
    assert np.isnan(m.iou[3]) and np.isnan(m.f1[3])  # in neither reference nor prediction
    assert m.miou == pytest.approx((3 / 5 + 3 / 6 + 1 / 3) / 3)
    assert m.to_dict()["classes"][3]["iou"] is None
    matrix.update(np.array([3]), np.array([0]))  # predicted 3 where reference is 0
    m = matrix.metrics()
    assert m.iou[3] == 0.0 and m.f1[3] == 0.0
    assert m.miou == pytest.approx((3 / 6 + 3 / 6 + 1 / 3 + 0) / 4)


def test_accumulation_is_window_independent_and_accepts_tensors():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(40, 30))
    labels[rng.random(labels.shape) < 0.1] = 255
    pred = rng.integers(0, 4, size=(40, 30))
    whole = ConfusionMatrix(4)
    whole.update(pred, labels)
    pieces = ConfusionMatrix(4)
    for top in range(0, 40, 7):
        rows = slice(top, top + 7)
        pieces.update(torch.from_numpy(pred[rows]), torch.from_numpy(labels[rows]))
    np.testing.assert_array_equal(whole.counts, pieces.counts)
    valid = labels != 255
    expected = np.zeros((4, 4), dtype=np.int64)
    np.add.at(expected, (labels[valid], pred[valid]), 1)
    np.testing.assert_array_equal(whole.counts[:, :4], expected)


def test_growing_class_count_and_label_outside_classes():
    matrix = ConfusionMatrix(None)
    matrix.update(np.array([0, 1]), np.array([0, 1]))
    matrix.update(np.array([4, 255]), np.array([2, 1]))
    assert matrix.num_classes == 5
    m = matrix.metrics()
    assert m.confusion[2, 4] == 1 and m.unpredicted[1] == 1 and m.confusion[1, 1] == 1
    fixed = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"label values \[7\] are outside the 3 classes"):
        fixed.update(np.array([0, 0]), np.array([0, 7]))


def test_mask_drops_pixels():
    matrix = ConfusionMatrix(3)
    matrix.update(PRED, LABELS, mask=np.zeros_like(LABELS, dtype=bool))
    assert matrix.counts.sum() == 0


def brute_force_boundary(labels: np.ndarray, radius: int, ignore: int = 255) -> np.ndarray:
    """Reference definition, pixel pair by pixel pair."""
    height, width = labels.shape
    out = np.zeros(labels.shape, dtype=bool)
    for y in range(height):
        for x in range(width):
            if labels[y, x] == ignore:
                continue
            for v in range(max(0, y - radius), min(height, y + radius + 1)):
                for u in range(max(0, x - radius), min(width, x + radius + 1)):
                    near = (v - y) ** 2 + (u - x) ** 2 <= radius**2
                    if near and labels[v, u] not in (ignore, labels[y, x]):
                        out[y, x] = True
    return out


#: A 6×5 reference: classes 0 and 1 side by side over a row of class 2 and an ignore row.
HAND_LABELS = np.array(
    [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [2, 2, 2, 2, 2, 2],
        [255, 255, 255, 255, 255, 255],
    ]
)


def test_boundary_mask_hand_example():
    labels = HAND_LABELS.copy()
    r1 = [
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],  # the ignore band is no class: no border with row 3
    ]
    r2 = [
        [0, 1, 1, 1, 1, 0],  # (0, 5) is 3 px from class 0 and from row 3
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
    ]
    np.testing.assert_array_equal(boundary_mask(labels, 1), np.array(r1, dtype=bool))
    np.testing.assert_array_equal(boundary_mask(labels, 2), np.array(r2, dtype=bool))
    assert not boundary_mask(labels, 0).any()


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_boundary_mask_matches_brute_force(radius):
    rng = np.random.default_rng(radius)
    labels = np.kron(rng.integers(0, 3, size=(5, 6)), np.ones((4, 3), dtype=np.int64))
    labels[rng.random(labels.shape) < 0.05] = 255
    np.testing.assert_array_equal(
        boundary_mask(labels, radius), brute_force_boundary(labels, radius)
    )


def test_eroded_scores_by_hand():
    """Erosion R=1 of the 6×5 example leaves 8 pixels: (0..1, 0..1) and (0..1, 4..5)."""
    labels = HAND_LABELS.copy()
    pred = np.zeros_like(labels)  # everything predicted as class 0
    matrix = ConfusionMatrix(3)
    matrix.update(pred, labels, mask=~boundary_mask(labels, 1))
    m = matrix.metrics()
    assert m.confusion.tolist() == [[4, 0, 0], [4, 0, 0], [0, 0, 0]]
    assert m.oa == pytest.approx(0.5)
    assert m.iou[0] == pytest.approx(0.5) and m.iou[1] == 0.0 and np.isnan(m.iou[2])
    assert m.miou == pytest.approx(0.25)
