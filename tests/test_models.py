"""The SCG-Net model family: sizes, shapes, maths, losses, backbone weights, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

import models
from geoseg_cli.cli import cli
from models import SegmentationLoss, SegmentationOutput, create_model

VARIANTS = models.list_models()
#: The variants with an SCG block (and its L_kl and L_dl).
SCG_VARIANTS = [name for name in VARIANTS if models.get_variant(name).scg is not None]
KEYS_JSON = Path(__file__).with_name("resnet50_torchvision_keys.json")

#: scg-gcn, resnet50, 3 bands, 6 classes (paper: 8.74 M).
SCG_GCN_PARAMS = 8_736_978
#: The ResNet-50 trunk up to layer3 alone.
RESNET50_TRUNK_PARAMS = 8_543_296


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small(name: str, classes: int = 4, bands: int = 3, **kw) -> models.SCGNet:
    return create_model(name, classes, bands, backbone="resnet18", **kw)


def run_scg(scg: models.scg.SCGBlock, features: torch.Tensor) -> models.scg.SCGOutput:
    """An SCG block on backbone features (projected first, as the head does)."""
    return scg(F.conv2d(features, scg.projection_weight()[:, :, None, None]))


def test_registry_and_errors() -> None:
    assert VARIANTS == [
        "scg-gcn",
        "scg-gin",
        "scg-gcn-gin",
        "scgae-gcn",
        "scgdir-gcn",
        "scgdir-gcn-gin",
        "scg-gcn-ns",
        "mscg-gcn",
        "cdgc",
    ]
    assert models.get_variant("scgdir-gcn-gin") == models.Variant(
        "scgdir-gcn-gin", scg="scgdir", gnn1="gcn", gnn2="gin", residual=True
    )
    with pytest.raises(ValueError, match="valid models: scg-gcn, scg-gin"):
        create_model("scg-gat", 6)
    with pytest.raises(ValueError, match="valid backbones: resnet50, resnet34, resnet18"):
        create_model("scg-gcn", 6, backbone="resnet101")
    with pytest.raises(ValueError, match="nodes"):
        create_model("scg-gcn", 6, nodes=(0, 4))


def test_parameter_count_matches_paper() -> None:
    with torch.device("meta"):
        model = create_model("scg-gcn", num_classes=6, in_channels=3)
    assert models.count_parameters(model) == SCG_GCN_PARAMS
    assert models.count_parameters(model.backbone) == RESNET50_TRUNK_PARAMS
    assert model.backbone.out_channels == 1024
    assert small("scg-gcn").backbone.out_channels == 256


def test_backbone_names_equal_torchvision() -> None:
    keys = json.loads(KEYS_JSON.read_text())["keys"]
    expected = {k: v for k, v in keys.items() if not k.startswith(("layer4.", "fc."))}
    with torch.device("meta"):
        trunk = models.ResNetTrunk("resnet50")
    assert {k: list(v.shape) for k, v in trunk.state_dict().items()} == expected


@pytest.mark.parametrize("name", VARIANTS)
def test_eval_forward_returns_one_logits_tensor(name: str) -> None:
    model = small(name, classes=5).eval()
    with torch.no_grad():
        for height, width in ((64, 64), (96, 160)):
            out = model(torch.rand(2, 3, height, width))
            assert isinstance(out, torch.Tensor)
            assert out.shape == (2, 5, height, width)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SCG_VARIANTS)
def test_training_step_finite_loss_and_grads(name: str) -> None:
    model = small(name).train()
    target = torch.randint(0, 4, (2, 64, 64))
    target[:, :8] = 255
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 4, 64, 64)
    loss = SegmentationLoss("dice+ce")(out, target)
    assert torch.isfinite(loss.total)
    assert set(loss.parts) == {"dice", "ce", "kl", "dl", "total"}
    loss.total.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
    assert model.head.scg.mu.weight.grad.abs().sum() > 0
    assert model.head.gnn1.linear.weight.grad.abs().sum() > 0


def _alone_and_in_batch(model: models.SCGNet, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Logits of one window alone and inside a batch of 4 other (differently scaled) windows."""
    model = model.to(dtype).eval()
    window = torch.rand(1, 3, 64, 64, dtype=dtype)
    scales = torch.tensor([3.0, 0.2, 1.0, 5.0], dtype=dtype).view(-1, 1, 1, 1)
    others = torch.rand(4, 3, 64, 64, dtype=dtype) * scales
    with torch.no_grad():
        return model(window), model(torch.cat([others[:2], window, others[2:]]))[2:3]


def test_batch_independence_in_eval_float32() -> None:
    torch.manual_seed(0)
    model = small("scg-gcn")
    alone, together = _alone_and_in_batch(model, torch.float32)
    torch.manual_seed(0)
    exact, _ = _alone_and_in_batch(model, torch.float64)
    # batch-size-dependent kernels round differently: allow a few times float32's own error
    tolerance = 4 * (alone.double() - exact).abs().max().item() + 1e-6
    assert (alone - together).abs().max().item() <= tolerance


@pytest.mark.parametrize("name", VARIANTS)
def test_batch_independence_in_eval_every_variant(name: str) -> None:
    # float64: what remains is rounding, so any cross-sample term (a γ averaged over the
    # batch, batch statistics) would show; in float32 GIN logits reach ~1e3, where 1e-5 is
    # below float32 resolution and batch-size-dependent conv kernels round differently.
    alone, together = _alone_and_in_batch(small(name), torch.float64)
    assert (alone - together).abs().max().item() <= 1e-9


def _dense_head_reference(head: models.SCGHead, features: torch.Tensor) -> torch.Tensor:
    """The head's eval maths with explicit node indexing and dense matrices."""
    batch, _, rows, cols = features.shape
    n = rows * cols
    dtype = features.dtype

    def nodes(t: torch.Tensor) -> torch.Tensor:  # node r*cols + c holds position (r, c)
        out = torch.empty(batch, n, t.shape[1], dtype=dtype)
        for r in range(rows):
            for c in range(cols):
                out[:, r * cols + c] = t[:, :, r, c]
        return out

    x = nodes(features)
    mean = nodes(head.scg.mu(features))
    log_sigma = nodes(head.scg.log_sigma(features)).clamp(max=1)
    adjacency = torch.relu(mean @ mean.transpose(1, 2))
    diag = torch.diagonal(adjacency, dim1=1, dim2=2)
    gamma = torch.sqrt(1 + n / diag.sum(-1)).view(-1, 1, 1)
    enhanced = adjacency + gamma * torch.diag_embed(diag)

    def layer(layer: models.gnn.GraphLayer, y: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(n, dtype=dtype).expand(batch, n, n)
        if layer.kind == "gcn":
            a = enhanced + eye
            d_r = (a.sum(-1) + 1e-5).rsqrt()
            d_c = (a.sum(-2) + 1e-5).rsqrt()
            propagation = torch.diag_embed(d_r) @ a @ torch.diag_embed(d_c)
        else:
            propagation = (1 + layer.omega) * eye + enhanced
        return propagation @ y @ layer.linear.weight.T + layer.linear.bias

    hidden = torch.relu(head.gnn1.norm(layer(head.gnn1, x).transpose(1, 2)).transpose(1, 2))
    y = layer(head.gnn2, hidden) + gamma * mean * (1 - log_sigma)
    return y.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["scg-gcn", "scg-gcn-gin"])
def test_head_matches_dense_formulas(name: str) -> None:
    head = small(name).head.eval()
    if name.endswith("gin"):
        head.gnn2.omega.data.fill_(0.3)
    features = torch.rand(2, 256, 3, 5)  # non-square: a transposed node order would show
    with torch.no_grad():
        fast = head(features).double()
        reference32 = _dense_head_reference(head, features).double()
        head.double()
        exact = _dense_head_reference(head, features.double())
        # in float64 the formulas agree to rounding; in float32 the head may differ from the
        # dense maths by a few times the dense maths' own float32 error, whatever the CPU
        torch.testing.assert_close(head(features.double()), exact, rtol=1e-9, atol=1e-9)
        float32_error = (reference32 - exact).abs().max().item()
        assert (fast - exact).abs().max().item() <= 8 * float32_error + 1e-6


@pytest.mark.parametrize(
    ("name", "nodes"), [("scg-gcn", None), ("scgae-gcn", None), ("scg-gcn-gin", (2, 3))]
)
def test_head_on_a_crop_of_projected_features_equals_head_on_the_crop(name, nodes) -> None:
    """What the shared engine relies on.

    Projecting a whole feature map once and decoding a window's crop gives the head's output on
    that window's features alone (the 3×3 convolution still sees zero padding at the window's
    border).
    """
    head = small(name, nodes=nodes).head.eval()
    features = torch.randn(2, 256, 9, 11)
    with torch.no_grad():
        projected = head.project(features)
        assert projected.shape == (2, head.projected_channels, 9, 11)
        for rows, cols in ((slice(0, 6), slice(0, 6)), (slice(2, 9), slice(3, 8))):
            alone = head(features[:, :, rows, cols])
            cropped = head.decode(projected[:, :, rows, cols])
            torch.testing.assert_close(cropped, alone, rtol=1e-4, atol=1e-4)
            # a conv over the whole map instead of the crop differs at the crop's border
            border = head.scg.mu(features)[:, :, rows, cols]
            assert not torch.allclose(border, head.scg.mu(features[:, :, rows, cols]))


@pytest.mark.parametrize("width", [models.gnn.NARROW_FEATURES - 1, models.gnn.NARROW_FEATURES])
def test_aggregate_nodes_is_a_times_x_for_any_adjacency(width: int) -> None:
    """Narrow node features take the transposed product.

    With a non-symmetric adjacency (as scgdir's) a wrong transpose would show.
    """
    generator = torch.Generator().manual_seed(0)
    adjacency = torch.rand(2, 7, 7, generator=generator)
    x = torch.randn(2, 7, width, generator=generator)
    torch.testing.assert_close(models.gnn.aggregate_nodes(adjacency, x), adjacency @ x)


def test_scgdir_adjacency_is_not_symmetric() -> None:
    features = torch.rand(2, 256, 4, 4)
    with torch.no_grad():
        directed = run_scg(small("scgdir-gcn").head.scg.eval(), features).graph.adjacency
        symmetric = run_scg(small("scg-gcn").head.scg.eval(), features).graph.adjacency
    assert (directed - directed.transpose(1, 2)).abs().max() > 1e-3
    torch.testing.assert_close(symmetric, symmetric.transpose(1, 2))


def test_scgae_has_no_kl_term() -> None:
    model = small("scgae-gcn")
    assert model.head.scg.log_sigma is None
    out = model.train()(torch.rand(2, 3, 64, 64))
    assert out.kl_loss.item() == 0.0
    assert torch.isfinite(out.dl_loss)
    variational = small("scg-gcn").train()(torch.rand(2, 3, 64, 64))
    assert variational.kl_loss.item() > 0


def test_losses_only_in_training() -> None:
    scg = small("scg-gcn").head.scg
    features = torch.rand(1, 256, 3, 3)
    with torch.no_grad():
        evaluated = run_scg(scg.eval(), features)
        trained = run_scg(scg.train(), features)
    assert evaluated.kl_loss is None and evaluated.dl_loss is None
    assert trained.kl_loss is not None and trained.dl_loss is not None
    assert not torch.equal(trained.graph.adjacency, evaluated.graph.adjacency)  # Z is sampled


def test_no_residual_variant_ignores_residual_branch() -> None:
    x = torch.rand(1, 3, 64, 64)
    for name, should_change in (("scg-gcn-ns", False), ("scg-gcn", True)):
        model = small(name).eval()
        with torch.no_grad():
            before = model(x)
            model.head.scg.log_sigma.weight.mul_(5.0).add_(0.1)
            after = model(x)
        assert (not torch.equal(before, after)) == should_change, name


def test_fixed_node_grid() -> None:
    model = small("scg-gcn", nodes=(2, 3)).eval()
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 64, 96))
        assert model.head(features).shape == (1, 4, 4, 6)
        assert model(torch.rand(1, 3, 64, 96)).shape == (1, 4, 64, 96)


def test_head_runs_in_float32_under_autocast() -> None:
    model = small("scg-gin").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 64, 64))
    assert out.logits.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in (out.logits, out.kl_loss, out.dl_loss))


def test_gin_training_steps_stay_finite() -> None:
    model = small("scg-gin").train()
    criterion = SegmentationLoss("dice")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 64, 64) * 2
    target = torch.randint(0, 4, (2, 64, 64))
    for _ in range(4):
        optimizer.zero_grad()
        loss = criterion(model(x), target).total
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.head.gnn1.omega.item() != 0.0  # ω learns


@pytest.mark.parametrize("name", VARIANTS)
def test_torch_export_every_variant(name: str) -> None:
    model = small(name, bands=4).eval()
    x = torch.rand(2, 4, 32, 48)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


# --- losses -------------------------------------------------------------------------------


def test_dice_loss_ignores_ignore_index() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    target[:, :, :3] = 255  # logits there still predict the old labels: must not count
    logits[:, :, :, :3] = logits[:, :, :, :3].flip(1)
    assert models.dice_loss(logits, target).item() < 1e-6
    assert models.dice_loss(logits.flip(1), target).item() > 0.5
    assert models.dice_loss(logits, torch.full_like(target, 255)).item() == 0.0


def test_cross_entropy_weights_and_ignore() -> None:
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0] = 255
    weights = torch.tensor([1.0, 2.0, 0.5])
    valid = target != 255
    log_probs = torch.log_softmax(logits, 1).permute(0, 2, 3, 1)[valid]
    labels = target[valid]
    picked = -log_probs[torch.arange(len(labels)), labels]
    expected = (picked * weights[labels]).sum() / weights[labels].sum()
    torch.testing.assert_close(models.cross_entropy_loss(logits, target, weights), expected)
    assert models.cross_entropy_loss(logits, torch.full_like(target, 255)).item() == 0.0


def test_segmentation_loss_is_paper_sum() -> None:
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    output = SegmentationOutput(logits, torch.tensor(0.25), torch.tensor(0.5))
    result = SegmentationLoss("dice")(output, target)
    expected = models.dice_loss(logits, target) + 0.75
    torch.testing.assert_close(result.total, expected)
    assert set(result.parts) == {"dice", "kl", "dl", "total"}
    both = SegmentationLoss("dice+ce", class_weights=[1, 1, 2, 1])(logits, target)
    assert set(both.parts) == {"dice", "ce", "total"}
    with pytest.raises(ValueError, match="dice, ce, dice\\+ce"):
        SegmentationLoss("focal")


# --- CLI -------------------------------------------------------------------------------------


def test_cli_models_json_counts() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == VARIANTS
    assert rows["scg-gcn"]["parameters"] == SCG_GCN_PARAMS
    assert rows["scg-gcn"]["default"] is True
    assert rows["scg-gin"]["parameters"] == SCG_GCN_PARAMS + 2  # one ω per GIN layer
    assert rows["scgae-gcn"]["parameters"] == SCG_GCN_PARAMS - (1024 * 6 + 6)  # no log σ conv
    assert rows["scg-gcn-ns"]["residual"] is False
    assert rows["scgdir-gcn-gin"]["scg"] == "scgdir"
    assert rows["scgdir-gcn-gin"]["gnn2"] == "gin"

    four = runner.invoke(cli, ["models", "--json", "--bands", "4", "--classes", "6"])
    counts = {row["name"]: row["parameters"] for row in json.loads(four.stdout)}
    assert counts["scg-gcn"] == SCG_GCN_PARAMS + 64 * 7 * 7  # one more first-conv band

    table = runner.invoke(cli, ["models", "--backbone", "resnet18", "--classes", "2"])
    assert table.exit_code == 0
    expected = models.count_parameters(create_model("scg-gcn", 2, backbone="resnet18"))
    assert f"{expected:,}" in table.stdout
    assert "scg-gcn (default)" in table.stdout


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_fuse_batchnorm_keeps_features(backbone: str) -> None:
    torch.manual_seed(0)
    trunk = models.ResNetTrunk(backbone, in_channels=4)
    for module in trunk.modules():  # non-trivial statistics, so that folding matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    with pytest.raises(RuntimeError, match="eval"):
        trunk.fuse_batchnorm()
    trunk.eval()
    x = torch.rand(2, 4, 80, 48)
    with torch.no_grad():
        before = trunk(x)
        trunk.fuse_batchnorm()
        after = trunk(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert after.shape == before.shape == (2, trunk.out_channels, 5, 3)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
