"""Loading torchvision/timm ResNet weights into the backbone: keys, band adaptation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models import WeightsError, create_model

KEYS_JSON = Path(__file__).with_name("resnet50_torchvision_keys.json")


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    """A random state dict with every key and shape of torchvision's resnet50."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, shape in json.loads(KEYS_JSON.read_text())["keys"].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.startswith(("layer4.", "fc.")):  # ignored by the loader: keep the file small
            state[key] = torch.zeros(()).expand(shape)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    return state


def test_backbone_weights_load_and_are_used(tmp_path, torchvision_state) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_state, path)
    model = create_model("scg-gcn", 6).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        models.load_backbone_weights(model, path)
        after = model(x)
    assert (before - after).abs().max() > 1e-3
    for key in ("conv1.weight", "layer3.5.bn3.running_var", "layer1.0.downsample.0.weight"):
        torch.testing.assert_close(model.backbone.state_dict()[key], torchvision_state[key])

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in torchvision_state.items()}}, wrapped)
    other = create_model("scg-gcn", 6)
    models.load_backbone_weights(other, wrapped)
    torch.testing.assert_close(
        other.backbone.layer2[3].conv2.weight, model.backbone.layer2[3].conv2.weight
    )


def test_backbone_weights_from_safetensors(tmp_path, torchvision_state) -> None:
    from safetensors.torch import save_file

    # as timm downloads them (layer4 and fc are ignored by the loader: left out, small file)
    state = {k: v for k, v in torchvision_state.items() if not k.startswith(("layer4.", "fc."))}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    model = create_model("scg-gcn", 6)
    models.load_backbone_weights(model, path)
    for key in ("conv1.weight", "layer3.5.bn3.running_var", "layer1.0.downsample.0.weight"):
        torch.testing.assert_close(model.backbone.state_dict()[key], state[key])


def test_backbone_weights_adapt_first_conv_to_four_bands(tmp_path, torchvision_state) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_state, path)
    model = create_model("scg-gcn", 6, in_channels=4)
    models.load_backbone_weights(model, path)
    rgb = torchvision_state["conv1.weight"]
    conv = model.backbone.conv1.weight.detach()
    assert conv.shape == (64, 4, 7, 7)
    torch.testing.assert_close(conv[:, :3], rgb * 0.75)
    torch.testing.assert_close(conv[:, 3], rgb.mean(dim=1) * 0.75)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", r"'layer2\.0\.conv1\.weight' has shape \(128, 256, 3, 3\)"),
        ("missing", r"missing key 'layer3\.5\.bn3\.running_mean'"),
        ("unexpected", r"unexpected key 'layer3\.6\.conv1\.weight'"),
    ],
)
def test_backbone_weights_errors_name_the_key(tmp_path, torchvision_state, change, message):
    state = dict(torchvision_state)
    if change == "shape":
        state["layer2.0.conv1.weight"] = torch.zeros(128, 256, 3, 3)
    elif change == "missing":
        del state["layer3.5.bn3.running_mean"]
    else:
        state["layer3.6.conv1.weight"] = torch.zeros(256, 1024, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with torch.device("meta"):  # the checks run before any weight is copied
        model = create_model("scg-gcn", 6)
    with pytest.raises(WeightsError, match=message):
        models.load_backbone_weights(model, path)


def test_backbone_weights_unreadable_file(tmp_path) -> None:
    model = create_model("scg-gcn", 4, 3, backbone="resnet18")
    with pytest.raises(WeightsError, match="no such backbone weights file"):
        models.load_backbone_weights(model, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth: not a readable PyTorch weights file;"):
        models.load_backbone_weights(model, tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.safetensors: not a readable \.safetensors"):
        models.load_backbone_weights(model, tmp_path / "junk.safetensors")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        models.load_backbone_weights(model, tmp_path / "list.pth")
