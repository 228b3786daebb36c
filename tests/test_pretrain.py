"""geoseg pretrain: masked-reconstruction backbone weights that --backbone-weights loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import coarse_scene, write_raster

from geoseg_cli.cli import cli
from geoseg_cli.errors import UsageError
from geoseg_cli.pretrain import PATCH, MaskedReconstruction, PretrainConfig, pretrain
from geoseg_cli.train import train
from geoseg_cli.train_config import TrainConfig
from models import create_model, load_backbone_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def rasters(tmp_path: Path) -> list[Path]:
    """Two unlabelled 3-band uint8 rasters of different sizes, one with a nodata corner."""
    first, _ = coarse_scene(96, 112, seed=1)
    first[:, :30, :40] = 0
    second, _ = coarse_scene(64, 80, seed=2)
    return [
        write_raster(tmp_path / "a.tif", first, nodata=0),
        write_raster(tmp_path / "b.tif", np.maximum(second, 1), nodata=0),
    ]


def test_pretrained_weights_load_into_the_model_and_train(rasters, chips, tmp_path) -> None:
    out = tmp_path / "backbone.pt"
    config = PretrainConfig(rasters, out, backbone="resnet18", window=32, steps=40, batch_size=4)
    result = pretrain(config)
    assert result.output == out and result.steps == 40 and len(result.losses) == 40
    assert np.isfinite(result.losses).all()
    assert result.last_loss < result.first_loss  # it learns to fill in the masked patches
    state = torch.load(out, weights_only=True)
    assert "conv1.weight" in state and "layer3.1.bn2.running_var" in state
    assert not any(k.startswith(("trunk.", "decoder", "layer4", "fc")) for k in state)
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    model = create_model("scg-gcn", 3, 3, backbone="resnet18")
    load_backbone_weights(model, out)
    for key, value in state.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    settings = {"backbone": "resnet18", "window": 32, "epochs": 1, "workers": 0, "device": "cpu"}
    run = train(TrainConfig(chips, tmp_path / "run", backbone_weights=out, **settings))
    assert run.step == 3 and run.best_path.is_file()  # the paper's recipe with weights


def test_same_seed_same_weights_and_refusals(rasters, tmp_path) -> None:
    settings = {"backbone": "resnet18", "window": 32, "steps": 2, "batch_size": 2, "seed": 3}
    a = pretrain(PretrainConfig(rasters, tmp_path / "a.pt", **settings))
    b = pretrain(PretrainConfig(rasters, tmp_path / "b.pt", **settings))
    assert a.losses == b.losses
    wa, wb = torch.load(a.output, weights_only=True), torch.load(b.output, weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(Exception, match="already exists"):
        pretrain(PretrainConfig(rasters, tmp_path / "a.pt", **settings))
    with pytest.raises(UsageError, match="multiple of 16"):
        pretrain(PretrainConfig(rasters, tmp_path / "c.pt", window=40))
    with pytest.raises(UsageError, match="mask ratio"):
        pretrain(PretrainConfig(rasters, tmp_path / "c.pt", mask_ratio=1.0))


def test_loss_counts_masked_valid_pixels_only() -> None:
    torch.manual_seed(0)
    model = MaskedReconstruction("resnet18", 2)
    images = torch.randn(1, 2, 32, 32)
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., :PATCH, :PATCH] = True
    valid = torch.ones_like(mask)
    valid[..., :4, :] = False
    loss = model(images, mask, valid)
    with torch.no_grad():
        features = model.trunk(images * ~mask)
        predicted = torch.nn.functional.pixel_shuffle(model.decoder(features), PATCH)
    expected = (predicted - images).abs()[..., 4:PATCH, :PATCH].mean()
    torch.testing.assert_close(loss, expected)


def test_cli_pretrain(rasters, tmp_path) -> None:
    out = tmp_path / "ssl.pt"
    args = ["pretrain", *map(str, rasters), "-o", str(out), "--backbone", "resnet18"]
    args += ["--window", "32", "--steps", "2", "--batch-size", "2", "-b", "1", "-b", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "pre-training resnet18 on 2 raster(s), bands [1, 2]" in result.output
    assert torch.load(out, weights_only=True)["conv1.weight"].shape == (64, 2, 7, 7)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "--overwrite" in result.output
