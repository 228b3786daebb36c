"""Training recipes: selection, learning-rate warnings, warm-up, chip sampler, augmentation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_train import small_config

from geoseg_cli.chips import load_stats, read_manifest
from geoseg_cli.cli import cli
from geoseg_cli.data import ChipDataset
from geoseg_cli.optim import lr_factor
from geoseg_cli.recipe import PAPER_LR, RECIPES, lr_mismatch
from geoseg_cli.sampling import ChipSampler, balanced_weights
from geoseg_cli.train import train
from geoseg_cli.train_config import TrainConfig, read_config_file, resume_config, write_config_file

pytestmark = pytest.mark.usefixtures("one_thread")


def scratch_config(chips: Path, output: Path, **overrides) -> TrainConfig:
    """The scratch recipe, shrunk: 24 draws (6 steps of 4) per epoch of 32 px windows."""
    settings = {"recipe": "auto", "lr": None, "window": 32, "min_epoch_samples": 24}
    return small_config(chips, output, **{**settings, **overrides})


def test_auto_recipe_follows_the_backbone_weights() -> None:
    scratch = TrainConfig("c", "o")
    assert scratch.recipe == "auto" and scratch.resolved_recipe == "scratch"
    assert {k: getattr(scratch, k) for k in RECIPES["scratch"].values()} == (
        RECIPES["scratch"].values()
    )
    assert scratch.lr == 3e-3 and scratch.sampler == "balanced" and scratch.loss == "dice+ce"
    paper = TrainConfig("c", "o", backbone_weights="resnet50.pth")
    assert paper.resolved_recipe == "paper"
    assert (paper.lr, paper.loss, paper.rot90, paper.sampler) == (
        PAPER_LR,
        "dice",
        False,
        "uniform",
    )
    assert paper.min_epoch_samples == 0 and paper.scale_jitter == 0 == paper.warmup_epochs
    # explicit settings win over the recipe, in either direction
    mixed = TrainConfig("c", "o", recipe="paper", lr=5e-4, sampler="balanced")
    assert (mixed.lr, mixed.sampler, mixed.loss) == (5e-4, "balanced", "dice")
    with pytest.raises(Exception, match="recipe 'fast' is unknown; valid: auto, paper, scratch"):
        TrainConfig.from_dict({"chips_dir": "c", "output": "o", "recipe": "fast"})


def test_config_file_keeps_the_recipe_and_old_runs_resume_as_paper(tmp_path: Path) -> None:
    config = TrainConfig(tmp_path, tmp_path / "run", color_jitter=0.1)
    write_config_file(config, tmp_path / "config.toml")
    saved = read_config_file(tmp_path / "config.toml")
    assert saved["recipe"] == "auto" and saved["sampler"] == "balanced"
    assert saved["color_jitter"] == 0.1 and saved["lr"] == 3e-3
    assert TrainConfig.from_dict(saved) == config
    # a config.toml written before recipes existed: the run used the paper's settings
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.toml").write_text(
        f'chips_dir = "{tmp_path}"\nepochs = 3\nlr = 0.0001\n', encoding="utf-8"
    )
    old = resume_config(tmp_path / "old", {"epochs": 5})
    assert old.resolved_recipe == "paper" and old.sampler == "uniform" and not old.rot90
    assert old.lr == 1e-4 and old.epochs == 5


def test_lr_mismatch_warnings() -> None:
    assert "fine-tuning rate" in lr_mismatch(PAPER_LR, has_weights=False)
    assert "--recipe scratch" in lr_mismatch(PAPER_LR, has_weights=False)
    assert "wash out the pretrained features" in lr_mismatch(1e-3, has_weights=True)
    assert lr_mismatch(1e-3, has_weights=False) is None
    assert lr_mismatch(PAPER_LR, has_weights=True) is None


def test_warmup_then_decay() -> None:
    factors = [lr_factor(s, 10, 100, 1.0, 1000, 1.0, warmup_steps=4) for s in range(6)]
    expected = [0.25 * 1.0, 0.5 * 0.99, 0.75 * 0.98, 1.0 * 0.97, 0.96, 0.95]
    assert factors == pytest.approx(expected)
    assert lr_factor(3, 10, 100, warmup_steps=0) == lr_factor(3, 10, 100)


def test_balanced_weights_sample_every_class_alike() -> None:
    counts = np.array([[100, 0], [90, 10], [100, 0], [50, 40], [0, 0]])
    weights = balanced_weights(counts)
    # class 0: 340 px, class 1: 50 px; half the draws per class, by its pixels
    expected = 0.5 * counts[:, 0] / 340 + 0.5 * counts[:, 1] / 50
    np.testing.assert_allclose(weights, expected)
    assert weights[4] == 0 and weights.sum() == pytest.approx(1)
    np.testing.assert_allclose(balanced_weights(np.zeros((4, 2))), 0.25)


def test_chip_sampler_is_seeded_sharded_and_oversamples_the_rare_class() -> None:
    counts = np.array([[1000, 0]] * 9 + [[900, 100]])  # one chip of ten holds the rare class
    weights = balanced_weights(counts)
    sampler = ChipSampler(10, 2000, weights, seed=3)
    sampler.set_epoch(4)
    first = list(sampler)
    assert len(first) == len(sampler) == 2000
    assert [draw for _, draw in first] == list(range(2000))
    again = ChipSampler(10, 2000, weights, seed=3)
    again.set_epoch(4)
    assert list(again) == first  # a resumed run draws epoch 4 alike
    again.set_epoch(5)
    assert list(again) != first
    rare = sum(chip == 9 for chip, _ in first) / 2000
    assert rare == pytest.approx(weights[9], abs=0.03) and rare > 0.5  # uniform: 0.1
    # two ranks split the same draws between them, padded to a multiple of the world size
    ranks = [ChipSampler(10, 7, weights, seed=3, rank=r, world_size=2) for r in (0, 1)]
    single = ChipSampler(10, 8, weights, seed=3)
    for s in (*ranks, single):
        s.set_epoch(1)
    assert [len(r) for r in ranks] == [4, 4]
    merged = sorted(list(ranks[0]) + list(ranks[1]), key=lambda item: item[1])
    assert merged == list(single)
    # no weights: whole permutations, every chip as often as the others
    uniform = ChipSampler(10, 30, None, seed=0)
    assert np.bincount([c for c, _ in uniform], minlength=10).tolist() == [3] * 10


def test_augmentations(chips: Path) -> None:
    stats = load_stats(chips)
    records = [r for r in read_manifest(chips) if r.split == "train"]
    assert records[0].counts and sum(records[0].counts) > 0
    plain = ChipDataset(chips, records, stats, 64, seed=1)
    image, label = plain[0]
    assert torch.equal(plain[(0, 5)][0], image)  # no random draw without augmentation
    jitter = ChipDataset(chips, records, stats, 64, color_jitter=0.3, seed=1)
    a, b = jitter[(0, 0)][0], jitter[(0, 1)][0]
    assert not torch.equal(a, b)  # two draws of one chip differ
    for band in range(image.shape[0]):  # a per-band gain and offset within ±0.3
        x, y = image[band].flatten().double(), a[band].flatten().double()
        gain, offset = np.polyfit(x.numpy(), y.numpy(), 1)
        assert 0.7 <= gain <= 1.3 and abs(offset) <= 0.3
        torch.testing.assert_close(y, gain * x + offset, atol=1e-4, rtol=0)
    zoom = ChipDataset(chips, records, stats, 64, scale_jitter=0.5, random_crop=True, seed=1)
    extents = set()
    for draw in range(8):
        zimage, zlabel = zoom[(0, draw)]
        assert zimage.shape == image.shape and zlabel.shape == label.shape
        assert set(zlabel.unique().tolist()) <= set(label.unique().tolist())
        columns = torch.nonzero((zlabel != stats.ignore_index).any(0)).flatten()
        extent = int(columns.max()) + 1
        extents.add(extent)
        assert torch.all(zimage[:, :, extent:] == 0)  # padding right of a zoomed-out chip
    assert min(extents) < 64 == max(extents)  # some draws zoom out (padded), some zoom in


def test_scratch_recipe_trains_logs_and_resumes_exactly(chips: Path, tmp_path: Path, caplog):
    settings = {"epochs": 2, "seed": 4}
    with caplog.at_level(logging.INFO, logger="geoseg_cli"):
        straight = train(scratch_config(chips, tmp_path / "straight", **settings))
    assert "recipe auto: scratch (no --backbone-weights): lr 0.003 with 1 epoch(s) of warm-up" in (
        caplog.text
    )
    assert "balanced sampler, at least 24 samples per epoch" in caplog.text
    assert "fine-tuning rate" not in caplog.text
    assert straight.step == 12  # 24 draws of the 12 train chips per epoch, batch 4

    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(scratch_config(chips, tmp_path / "resumed", **settings), on_epoch_end=interrupt)
    resumed = train(resume_config(tmp_path / "resumed"), resume=True)
    a = torch.load(straight.last_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.last_path, weights_only=True)["state_dict"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    assert [r["miou"] for r in straight.history] == [r["miou"] for r in resumed.history]


def test_paper_recipe_without_weights_warns(chips: Path, tmp_path: Path) -> None:
    args = ["train", str(chips), "-o", str(tmp_path / "run"), "--recipe", "paper"]
    args += ["--backbone", "resnet18", "--window", "32", "--epochs", "1", "--workers", "0"]
    args += ["--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "recipe paper: lr 6.01e-05, loss dice" in result.output
    assert "warning: learning rate 6.01e-05 is a fine-tuning rate" in result.output
    saved = read_config_file(tmp_path / "run" / "config.toml")
    assert saved["recipe"] == "paper" and saved["lr"] == PAPER_LR
