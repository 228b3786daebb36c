"""Row-streamed features (models.streaming): one pass over an area, fed a few rows at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg_cli.inference.tta import tta_views
from models import Dihedral, FeatureStream, InferenceModel, create_model

torch.set_num_threads(2)


def _inference_model(backbone: str, fuse: bool = True, variant: str = "scg-gcn") -> InferenceModel:
    """An untrained network (4 bands) with non-trivial BatchNorm statistics, for inference."""
    torch.manual_seed(0)
    model = create_model(variant, 3, 4, backbone=backbone)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    if fuse:
        model.backbone.fuse_batchnorm()
    return InferenceModel(model, [0.3, 0.4, 0.5, 0.2], [0.2, 0.25, 0.3, 0.1]).eval()


def _streamed(module: InferenceModel, view, image: np.ndarray, runs: list[int]) -> np.ndarray:
    """Feed ``image`` (C×H×W) in runs of the given row counts (the last run also ends it)."""
    stream = FeatureStream(module, Dihedral(view.k, view.flip), *image.shape[1:])
    x = torch.from_numpy(image)[None].contiguous(memory_format=torch.channels_last)
    out, row = [], 0
    with torch.inference_mode():
        for i, rows in enumerate(runs):
            out.append(stream.push(x[:, :, row : row + rows], last=i == len(runs) - 1))
            row += rows
    assert row == image.shape[1]
    return torch.cat(out, dim=2)[0].numpy()


@pytest.mark.parametrize(
    ("variant", "backbone"),
    [("scg-gcn", "resnet18"), ("scg-gcn", "resnet50"), ("cdgc", "resnet18")],
)
def test_streams_give_one_pass_in_every_view_however_rows_are_split(variant, backbone):
    """All eight dihedral views on a non-square area (rotations swap its sides).

    The stream's features equal the view's pass over the whole area mapped back, fed in runs of
    16 rows, in uneven runs (one of them empty) or all at once. cdgc's projection (reduction
    with BN and ReLU, coarse classifier, φ, φ′) is per position too.
    """
    module = _inference_model(backbone, variant=variant)
    image = np.random.default_rng(1).random((4, 64, 96), dtype=np.float32)
    for view in tta_views("d4"):
        with torch.inference_mode():
            viewed = torch.from_numpy(np.ascontiguousarray(view.apply(image)))[None]
            expected = view.invert(module.features(viewed)[0].numpy())
        assert expected.shape == (module.model.head.projected_channels, 4, 6)
        for runs in ([16] * 4, [5, 0, 27, 32], [64]):
            actual = _streamed(module, view, image, runs)
            np.testing.assert_allclose(actual, expected, atol=2e-4 * np.abs(expected).max())


def test_rows_come_as_soon_as_their_inputs_are_fed():
    """A feature row needs input rows down to its receptive field.

    None is returned after the first 16 input rows, some before the end, all of them once the
    input ends.
    """
    module = _inference_model("resnet18")
    image = torch.rand(1, 4, 160, 64)
    stream = FeatureStream(module, Dihedral(), 160, 64)
    with torch.inference_mode():
        counts = [
            stream.push(image[:, :, r : r + 16], last=r == 144).shape[2] for r in range(0, 160, 16)
        ]
    assert counts[0] == 0 and 0 < sum(counts[:-1]) < 10 and sum(counts) == 10


def test_stream_needs_a_fused_trunk_and_an_area_on_the_feature_grid():
    view = Dihedral()
    with pytest.raises(ValueError, match="fuse_batchnorm"):
        FeatureStream(_inference_model("resnet18", fuse=False), view, 64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        FeatureStream(_inference_model("resnet18"), view, 64, 72)
