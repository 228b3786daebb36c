"""The mscg-gcn and cdgc heads: definitions, sampling, masking, losses, engines, export, options."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_checkpoint

import models
from geoseg_cli.checkpoint import load_checkpoint, save_checkpoint
from geoseg_cli.cli import cli
from geoseg_cli.export.metadata import FP32_TOLERANCE
from geoseg_cli.export.onnx import export_onnx
from geoseg_cli.inference.torch_runtime import TorchRuntime
from geoseg_cli.optim import forward_loss, optimizer_step
from geoseg_cli.train_config import read_config_file
from models import InferenceModel, SegmentationLoss, SegmentationOutput, create_model
from models.cdgc import cell_labels, class_adjacency, sample_nodes
from models.inference import mean_probabilities

torch.set_num_threads(2)

NEW = ["mscg-gcn", "cdgc"]
#: resnet50, 3 bands, 6 classes: mscg-gcn shares scg-gcn's weights across its three views.
PARAMS_RESNET50 = {"mscg-gcn": 8_736_978, "cdgc": 9_669_202}
PARAMS_RESNET18 = {"mscg-gcn": 2_832_082, "cdgc": 3_707_474}
I = 255  # noqa: E741 - the ignore index in hand-made label maps


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small(name: str, classes: int = 3, **options) -> models.SCGNet:
    return create_model(name, classes, 3, backbone="resnet18", **options)


def randomize_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that untrained heads give varied outputs."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)


def assert_varied(name: str, features: np.ndarray | torch.Tensor) -> None:
    """For cdgc, check that the coarse map holds several classes (non-trivial graphs)."""
    if name == "cdgc":
        coarse = np.asarray(features)[:, 256:259]
        assert len(np.unique(coarse.argmax(1))) > 1


def cdgc_head_size(c: int, d: int, m: int) -> int:
    """Parameters of the cdgc head from its formula.

    Reduction + BN, coarse classifier, φ and φ′, one D×D graph weight per class, fusion +
    BN, refined classifier, aux classifier.
    """
    return (
        (c * d + 2 * d)
        + (d * m + m)
        + d * d
        + m * d * d
        + (m * d * d + 2 * d)
        + (2 * d * m + m)
        + (c * m + m)
    )


# --- registry -------------------------------------------------------------------------------


def test_registry_rows_and_pinned_parameter_counts() -> None:
    assert models.list_models()[-2:] == NEW
    assert models.get_variant("mscg-gcn") == models.Variant(
        "mscg-gcn", head="mscg", scg="scg", gnn1="gcn", gnn2="gcn", residual=True
    )
    assert models.get_variant("cdgc") == models.Variant("cdgc", head="cdgc")
    for backbone, pinned in (("resnet50", PARAMS_RESNET50), ("resnet18", PARAMS_RESNET18)):
        rows = {row["name"]: row for row in models.describe_models(6, 3, backbone)}
        assert {name: rows[name]["parameters"] for name in NEW} == pinned
        assert rows["mscg-gcn"]["parameters"] == rows["scg-gcn"]["parameters"]
        with torch.device("meta"):
            model = create_model("cdgc", 6, 3, backbone=backbone)
            narrow = create_model("cdgc", 6, 3, backbone=backbone, channels=64)
        channels = model.backbone.out_channels
        assert models.count_parameters(model.head) == cdgc_head_size(channels, 256, 6)
        assert models.count_parameters(narrow.head) == cdgc_head_size(channels, 64, 6)

    result = CliRunner().invoke(cli, ["models", "--json"])
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {name: rows[name]["parameters"] for name in NEW} == PARAMS_RESNET50
    assert rows["cdgc"]["head"] == "cdgc" and rows["cdgc"]["scg"] is None
    assert rows["cdgc"]["options"]["keep"] == 0.5
    table = CliRunner().invoke(cli, ["models", "--backbone", "resnet18"]).stdout
    assert "3,707,474" in table and "mscg-gcn" in table


def test_options_are_checked_with_the_valid_names() -> None:
    assert models.model_options("cdgc") == {
        "channels": 256,
        "keep": 0.5,
        "dynamic_sampling": True,
        "coarse_weight": 0.6,
        "refined_weight": 0.7,
        "aux_weight": 0.4,
    }
    assert models.model_options("mscg-gcn") == {"nodes": None}
    with pytest.raises(ValueError, match="model cdgc has no option nodes; valid options: chan"):
        create_model("cdgc", 3, nodes=(4, 4))
    with pytest.raises(ValueError, match="has no option keep; valid options: nodes"):
        create_model("scg-gcn", 3, keep=0.2)
    with pytest.raises(ValueError, match=r"keep must be a number in \[0, 1\], got 1.5"):
        create_model("cdgc", 3, keep=1.5)
    with pytest.raises(ValueError, match="channels must be even"):
        create_model("cdgc", 3, channels=33)
    with pytest.raises(ValueError, match="dynamic_sampling must be true or false"):
        create_model("cdgc", 3, dynamic_sampling="no")
    with pytest.raises(ValueError, match=r"valid models: scg-gcn, .*, mscg-gcn, cdgc"):
        create_model("cdgc2", 3)


# --- mscg-gcn ------------------------------------------------------------------------------


def _single_and_multi() -> tuple[models.SCGHead, models.MultiViewSCGHead]:
    multi = small("mscg-gcn").head
    randomize_batchnorm(multi)
    single = small("scg-gcn").head
    single.load_state_dict(multi.state_dict())
    return single, multi


def test_mscg_equals_its_definition_on_transposed_and_mirrored_features() -> None:
    """Mscg-gcn is Σ over F, Fᵀ and F mirrored of the single-view head, mapped back.

    Same weights; on a non-square map, so the transposed view has its sides swapped.
    """
    single, multi = _single_and_multi()
    features = torch.randn(2, 256, 4, 6)
    single.eval(), multi.eval()
    with torch.no_grad():
        views = [
            single(features),
            single(features.transpose(2, 3)).transpose(2, 3),
            single(features.flip(3)).flip(3),
        ]
        torch.testing.assert_close(multi(features), views[0] + views[1] + views[2])
    assert min((views[0] - view).abs().max().item() for view in views[1:]) > 1e-2

    # training: same noise draws in the same view order → same logits and summed losses
    single.train(), multi.train()
    torch.manual_seed(5)
    out = multi(features)
    torch.manual_seed(5)
    parts = [
        single(features),
        single(features.transpose(2, 3)),
        single(features.flip(3)),
    ]
    expected = parts[0].logits + parts[1].logits.transpose(2, 3) + parts[2].logits.flip(3)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.kl_loss, sum(p.kl_loss for p in parts))
    torch.testing.assert_close(out.dl_loss, sum(p.dl_loss for p in parts))


# --- cdgc: nodes, masks and losses ------------------------------------------------------------


def test_cell_labels_are_the_majority_of_valid_classes() -> None:
    labels = torch.tensor(
        [
            [0, 0, 1, I, I, I, 2, 2],
            [0, 1, 1, I, I, 0, 2, 9],
            [2, 2, 1, 1, 0, 0, 0, 0],
            [2, 1, 1, I, 0, 0, 0, 0],
        ]
    )[None]
    # 2×2 cells: majorities, a 2–2 tie of class 1 and ignore (the class wins), a cell that
    # is mostly ignore (3 of 4: no class, 3), a value outside the classes (9) is no class
    cells = cell_labels(labels, 3, (2, 4))
    assert cells.tolist() == [[0, 1, 3, 2, 2, 1, 0, 0]]


def _hand_made_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse classes [0 0 0 0 1 1 2 2]; ground truth [0 0 0 1 1 – 2 0] (– no class)."""
    classes = torch.arange(3).view(1, 3, 1)
    coarse = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2]]).unsqueeze(1) == classes
    truth = torch.tensor([[0, 0, 0, 1, 1, 3, 2, 0]]).unsqueeze(1) == classes
    return coarse, truth


@pytest.mark.parametrize("keep", [0.0, 0.25, 0.5, 1.0])
def test_dynamic_sampling_set_algebra(keep: float) -> None:
    coarse, truth = _hand_made_masks()
    union = {0: {0, 1, 2, 3, 7}, 1: {3, 4}, 2: {6, 7}}  # C ∪ G without the unlabelled 5
    easy = {0: {0, 1, 2}, 1: {4}, 2: {6}}  # C ∩ G
    generator = torch.Generator().manual_seed(1)
    nodes = sample_nodes(coarse, truth, keep, generator)
    for m in range(3):
        chosen = set(torch.nonzero(nodes[0, m]).flatten().tolist())
        assert chosen <= union[m]
        assert union[m] - easy[m] <= chosen  # hard positives and false positives stay
        assert len(chosen & easy[m]) == math.floor(keep * len(easy[m]) + 0.5)
    assert not nodes[0, :, 5].any()  # no label: never a node


def test_dynamic_sampling_is_reproducible_and_uniform() -> None:
    coarse, truth = _hand_made_masks()

    def draw(seed: int) -> torch.Tensor:
        return sample_nodes(coarse, truth, 0.5, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    dropped = torch.stack([~draw(seed)[0, 0, :3] for seed in range(300)]).float().mean(0)
    assert dropped.sum().item() == pytest.approx(1.0)  # one of the three easy positives
    assert ((dropped > 0.25) & (dropped < 0.42)).all(), dropped


def test_class_adjacency_rows_sum_to_one_over_the_class_nodes() -> None:
    similarity = torch.randn(2, 6, 6, requires_grad=True)
    nodes = torch.zeros(2, 3, 6, dtype=torch.bool)
    nodes[0, 0, [0, 2, 3]] = True
    nodes[0, 1, [1, 4, 5]] = True  # class 2 of sample 0 is empty
    nodes[1, 0, [0, 1, 2, 3]] = True
    nodes[1, 1, 4] = True  # a one-node graph
    nodes[1, 2, [5, 0]] = True  # position 0 in two graphs (as in training)
    adjacency = class_adjacency(similarity, nodes)
    assert torch.isfinite(adjacency).all()
    for b in range(2):
        for m in range(3):
            members = nodes[b, m]
            a = adjacency[b, m]
            assert (a[~members] == 0).all()  # rows of other positions
            assert (a[:, ~members] == 0).all()  # columns of other positions
            if members.any():
                rows = a[members][:, members]
                torch.testing.assert_close(rows.sum(-1), torch.ones(int(members.sum())))
                expected = torch.softmax(similarity[b][members][:, members], dim=-1)
                torch.testing.assert_close(rows, expected)
    assert (adjacency[0, 2] == 0).all()
    adjacency.sum().backward()
    assert torch.isfinite(similarity.grad).all()


def test_cdgc_nodes_eval_is_the_coarse_mask_and_training_needs_labels() -> None:
    model = small("cdgc")
    randomize_batchnorm(model)
    x, labels = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, labels))  # labels unused in eval
    model.train()
    with pytest.raises(ValueError, match=r"needs the labels in training: call net\(images, lab"):
        model(x)
    plain = small("cdgc", dynamic_sampling=False).train()
    assert isinstance(plain(x), SegmentationOutput)
    assert not plain.head.dynamic_sampling


def test_ohem_keeps_the_hard_pixels() -> None:
    probs = torch.tensor([0.9, 0.8, 0.6, 0.3, 0.5])
    logits = torch.stack([torch.log(probs), torch.log(1 - probs)])[None, :, None]  # 1×2×1×5
    target = torch.tensor([[[0, 0, 0, 0, I]]])
    loss = models.ohem_cross_entropy
    expected = -(math.log(0.6) + math.log(0.3)) / 2  # p ≤ 0.7; the ignored pixel never
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    at_least_three = -(math.log(0.8) + math.log(0.6) + math.log(0.3)) / 3
    assert loss(logits, target, min_kept=0.75).item() == pytest.approx(at_least_three, rel=1e-5)
    assert loss(logits, torch.full_like(target, I)).item() == 0.0


def test_cdgc_loss_is_the_weighted_recipe_and_weights_are_options() -> None:
    target = torch.randint(0, 3, (2, 64, 64))
    target[:, :4] = I
    x = torch.rand(2, 3, 64, 64)
    for options, weights in (
        ({}, (0.6, 0.7, 0.4)),
        ({"coarse_weight": 1, "aux_weight": 0}, (1, 0.7, 0)),
    ):
        torch.manual_seed(0)
        out = small("cdgc", **options).train()(x, target)
        assert set(out.auxiliary) == {"coarse", "aux"} and out.ohem
        assert out.kl_loss is None and out.dl_loss is None
        result = SegmentationLoss("dice")(out, target)
        assert set(result.parts) == {"ohem", "coarse", "aux", "total"}
        ce = models.cross_entropy_loss
        expected = {
            "coarse": weights[0] * ce(out.auxiliary["coarse"].logits, target),
            "ohem": weights[1] * models.ohem_cross_entropy(out.logits, target),
            "aux": weights[2] * ce(out.auxiliary["aux"].logits, target),
        }
        for name, value in expected.items():
            torch.testing.assert_close(result.parts[name], value.detach())
        torch.testing.assert_close(result.total, sum(expected.values()))
        assert out.auxiliary["coarse"].logits.shape == out.logits.shape == (2, 3, 64, 64)


# --- both heads: batch independence, gradients, training, engines, export ---------------------


@pytest.mark.parametrize("name", NEW)
def test_a_window_does_not_depend_on_its_batch(name: str) -> None:
    model = small(name).double()
    randomize_batchnorm(model)
    model.eval()
    window = torch.rand(1, 3, 64, 96, dtype=torch.float64)
    others = torch.rand(4, 3, 64, 96, dtype=torch.float64) * torch.tensor(
        [3.0, 0.2, 1.0, 5.0], dtype=torch.float64
    ).view(-1, 1, 1, 1)
    with torch.no_grad():
        alone = model(window)
        together = model(torch.cat([others[:2], window, others[2:]]))[2:3]
    assert (alone - together).abs().max().item() <= 1e-9


@pytest.mark.parametrize("name", NEW)
def test_gradients_reach_every_parameter_and_a_train_step_stays_finite(name: str) -> None:
    model = small(name).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    labels[:, :8] = I
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    criterion = SegmentationLoss("dice+ce")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # geoseg train's step: forward_loss(net(images, labels)), then step
        loss = forward_loss(model, criterion, images, labels, None)
        assert torch.isfinite(loss)
        optimizer_step(loss, optimizer, scaler, scheduler)
        for pname, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
            assert param.grad.abs().sum() > 0, pname
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


@pytest.mark.parametrize("name", NEW)
def test_project_then_decode_is_the_network(name: str) -> None:
    """The shared engine's split (features once, the head per window) equals the graph.

    Features once, the head per window, then the upsampling and softmax, against the
    exported graph on windows on the 16-px grid.
    """
    model = small(name)
    randomize_batchnorm(model)
    module = InferenceModel(model.eval(), [0.4] * 3, [0.25] * 3).eval()
    x = torch.rand(3, 3, 64, 96)
    with torch.no_grad():
        expected = module(x)
        features = module.features(x)
        logits = module.head_logits(features)
        actual = torch.stack([mean_probabilities(item[None]) for item in logits])
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=0)
    assert_varied(name, features)


def _runtime(tmp_path, name: str) -> TorchRuntime:
    path = save_tiny_checkpoint(tmp_path / f"{name}.pt", window=32, seed=3, variant=name)
    ckpt = load_checkpoint(path)
    model = create_model(name, 3, 3, backbone="resnet18")
    model.load_state_dict(ckpt.state_dict)
    randomize_batchnorm(model)
    ckpt.state_dict = model.state_dict()
    save_checkpoint(ckpt, path)
    return TorchRuntime(path, "cpu")


@pytest.mark.parametrize("name", NEW)
def test_onnx_export_parity(tmp_path, name: str) -> None:
    runtime = _runtime(tmp_path, name)
    checkpoint = tmp_path / f"{name}.pt"
    result = export_onnx(checkpoint, tmp_path / f"{name}.onnx")
    assert result.max_abs_diff <= FP32_TOLERANCE
    assert result.split_max_abs_diff <= FP32_TOLERANCE
    assert result.class_agreement == 1.0
    assert_varied(name, runtime.features(np.random.default_rng(0).random((2, 3, 32, 32), "f4")))


# --- the option route: geoseg train --model-option, [model_options], checkpoint -----------------


def test_train_model_options_reach_the_checkpoint(chips, tmp_path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text('variant = "cdgc"\n\n[model_options]\nkeep = 0.25\nchannels = 32\n')
    run = tmp_path / "run"
    base = ["-q", "train", str(chips), "-o", str(run), "--config", str(config)]
    base += shlex.split("--backbone resnet18 --window 64 --epochs 1 --workers 0 --device cpu")
    base += ["--recipe", "paper"]  # one pass over the chips per epoch
    options = ["--model-option", "dynamic-sampling=false", "--model-option", "keep=0.75"]
    result = CliRunner().invoke(cli, [*base, *options])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.model.variant == "cdgc"
    assert ckpt.model.options == {"keep": 0.75, "channels": 32, "dynamic_sampling": False}
    assert TorchRuntime(run / "best.pt", "cpu").module.model.head.channels == 32
    saved = read_config_file(run / "config.toml")
    assert saved["model_options"] == ckpt.model.options
    assert (run / "config.toml").read_text().rstrip().endswith("dynamic_sampling = false")

    other = CliRunner().invoke(cli, [*base, "--model", "mscg-gcn", "--overwrite"])  # timm's flag
    assert other.exit_code == 2 and "model mscg-gcn has no option" in other.output
    bad = CliRunner().invoke(cli, [*base, "--model-option", "r=0.3", "--overwrite"])
    assert bad.exit_code == 2
    assert "model cdgc has no option r; valid options: channels, keep" in bad.output
    bad = CliRunner().invoke(cli, [*base, *options[:2], "--model-option", "keep", "--overwrite"])
    assert bad.exit_code == 2 and "is not KEY=VALUE" in bad.output
