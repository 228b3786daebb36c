"""Self-supervised pre-training of the ResNet backbone on unlabelled rasters (SimMIM)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR

from geoseg_cli.distributed import resolve_device
from geoseg_cli.errors import GeosegError, InputError, UsageError
from geoseg_cli.image_inputs import inspect_images
from geoseg_cli.optim import lr_factor
from geoseg_cli.progress import progress
from geoseg_cli.raster import atomic_output, check_output, open_raster, read_masked
from geoseg_cli.tiling import default_scale
from models import BACKBONES, DEFAULT_BACKBONE, ResNetTrunk

log = logging.getLogger(__name__)

#: Side of a masked patch in pixels: one backbone output pixel (output stride 16).
PATCH = 16
#: Random windows read to estimate the band statistics.
STATS_WINDOWS = 32
#: Draws allowed per window before giving up on finding one with little enough nodata.
WINDOW_ATTEMPTS = 50


@dataclass
class PretrainConfig:
    """A pre-training run.

    Attributes:
        rasters: Unlabelled image rasters (anything rasterio opens), alike in bands and dtype.
        output: The weights file to write (``.pt``).
        backbone: ``resnet50``, ``resnet34`` or ``resnet18``: the ``--backbone`` of the
            ``geoseg train`` run that will load the weights.
        window: Window side in pixels (multiple of 16).
        steps: Optimizer steps.
        batch_size: Windows per step.
        lr: Peak learning rate of AdamW (linear warm-up over the first 5 % of the steps,
            then polynomial decay to 0).
        weight_decay: AdamW weight decay.
        mask_ratio: Share of the 16 × 16 px patches masked in each window.
        bands: 1-based bands to read (default: every band but alpha bands), as ``geoseg
            tile -b`` selects them.
        scale: Raw-value factor (default as ``geoseg tile``: 1/255 uint8, 1/10000 other
            integers, 1 float).
        max_nodata: Skip windows with a larger nodata fraction.
        seed: Seed of the initial weights, windows, masks and flips.
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: Replace an existing output file.
    """

    rasters: list[str]
    output: Path
    backbone: str = DEFAULT_BACKBONE
    window: int = 128
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    mask_ratio: float = 0.6
    bands: list[int] | None = None
    scale: float | None = None
    max_nodata: float = 0.5
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        """Check value ranges and names.

        Raises:
            UsageError: The first invalid setting.
        """
        checks = [
            (bool(self.rasters), "give at least one raster"),
            (
                self.backbone in BACKBONES,
                f"backbone {self.backbone!r} is unknown; valid: {', '.join(BACKBONES)}",
            ),
            (
                self.window >= PATCH and self.window % PATCH == 0,
                f"window {self.window} must be a multiple of 16 (e.g. 128)",
            ),
            (self.steps >= 1 and self.batch_size >= 1, "steps and batch size must be ≥ 1"),
            (self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight decay ≥ 0"),
            (0 < self.mask_ratio < 1, f"mask ratio must be in (0, 1), not {self.mask_ratio}"),
            (0 <= self.max_nodata < 1, f"max nodata must be in [0, 1), not {self.max_nodata}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclass
class PretrainResult:
    """What :func:`pretrain` wrote: the weights file, steps, losses and time."""

    output: Path
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list, repr=False)


class MaskedReconstruction(nn.Module):
    """A ResNet trunk and a linear decoder from each output pixel to its 16 × 16 patch."""

    def __init__(self, backbone: str, in_channels: int) -> None:
        super().__init__()

        self.trunk = ResNetTrunk(backbone, in_channels)
        self.decoder = nn.Conv2d(self.trunk.out_channels, PATCH * PATCH * in_channels, 1)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Mean absolute error of the reconstruction over masked valid pixels.

        Args:
            images: B×C×H×W standardized windows (0 where invalid).
            mask: B×1×H×W, True where a pixel is masked.
            valid: B×1×H×W, True where a pixel is valid.
        """
        features = self.trunk(images * ~mask)
        predicted = F.pixel_shuffle(self.decoder(features), PATCH)
        scored = (mask & valid).expand_as(images)
        return (predicted - images).abs()[scored].mean()


class _Windows:
    """Random standardized windows of open rasters, with their valid masks."""

    def __init__(
        self,
        config: PretrainConfig,
        infos: list,
        datasets: list[rasterio.DatasetReader],
        rng: np.random.Generator,
    ) -> None:
        self.infos = infos
        self.datasets = datasets
        self.bands = list(infos[0].bands)
        self.size = config.window
        self.max_nodata = config.max_nodata
        self.rng = rng
        self.scale = config.scale or default_scale(infos[0].dtype)
        areas = np.array([(i.width - self.size + 1) * (i.height - self.size + 1) for i in infos])
        self.odds = areas / areas.sum()
        samples = [self._read() for _ in range(STATS_WINDOWS)]
        pixels = np.concatenate([image[:, valid] for image, valid in samples], axis=1)
        self.mean = pixels.mean(axis=1).astype(np.float32)[:, None, None]
        self.std = pixels.std(axis=1).astype(np.float32)[:, None, None]
        if np.any(self.std <= 0):
            raise InputError(f"{infos[0].path}: a band is constant; drop it with -b")

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        """A random window with little enough nodata: raw × scale (float32) and its mask."""
        for _ in range(WINDOW_ATTEMPTS):
            index = int(self.rng.choice(len(self.infos), p=self.odds))
            info = self.infos[index]
            col = int(self.rng.integers(0, info.width - self.size + 1))
            row = int(self.rng.integers(0, info.height - self.size + 1))
            window = Window(col, row, self.size, self.size)
            data, valid = read_masked(self.datasets[index], window, self.bands)
            if valid.any() and 1 - valid.mean() <= self.max_nodata:
                return data.astype(np.float32) * np.float32(self.scale), valid
        raise InputError(
            f"no window of {self.size} px with at most {self.max_nodata:.0%} nodata found in "
            f"{WINDOW_ATTEMPTS} draws; check the rasters' nodata or raise --max-nodata"
        )

    def batch(self, count: int, mask_ratio: float) -> tuple[torch.Tensor, ...]:
        """``count`` flipped/turned windows (0 where invalid) with valid and patch masks."""
        images, valids, masks = [], [], []
        grid = self.size // PATCH
        n_masked = round(mask_ratio * grid * grid)
        for _ in range(count):
            raw, valid = self._read()
            image = np.where(valid, (raw - self.mean) / self.std, 0).astype(np.float32)
            turns = int(self.rng.integers(0, 4))
            image, valid = np.rot90(image, turns, axes=(1, 2)), np.rot90(valid, turns)
            if self.rng.random() < 0.5:
                image, valid = image[:, :, ::-1], valid[:, ::-1]
            patches = np.zeros(grid * grid, dtype=bool)
            patches[self.rng.permutation(grid * grid)[:n_masked]] = True
            mask = np.kron(patches.reshape(grid, grid), np.ones((PATCH, PATCH), dtype=bool))
            images.append(np.ascontiguousarray(image))
            valids.append(np.ascontiguousarray(valid))
            masks.append(mask)
        return (
            torch.from_numpy(np.stack(images)),
            torch.from_numpy(np.stack(masks))[:, None],
            torch.from_numpy(np.stack(valids))[:, None],
        )


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Pre-train a backbone by masked reconstruction and save its torchvision-style weights.

    The method is masked image modelling with a linear decoder (SimMIM, Xie et al., CVPR 2022,
    here on a convolutional trunk): random windows are read from the rasters and standardized
    per band; a random ``mask_ratio`` of their 16 × 16 px patches (one patch per backbone
    output pixel) is set to the band means (0 after standardization); the trunk encodes the
    masked window and a 1 × 1 convolution predicts the 256 pixels of every patch from its
    feature vector; the loss is the mean absolute error over the masked, valid pixels. Random
    flips and 90° turns vary the windows.

    The output is the trunk's state dict with torchvision's key names (``conv1.weight``,
    ``layer1.0.bn1.running_mean`` ...), saved with ``torch.save``: what ``geoseg train
    --backbone-weights`` (:func:`models.load_backbone_weights`) reads.

    Args:
        config: The run (see :class:`PretrainConfig`).

    Returns:
        The output path, steps and the loss at the start and end.

    Raises:
        GeosegError: Unreadable or inconsistent rasters, an existing output (without
            ``overwrite``), or a loss that became NaN/inf.
    """
    config.validate()
    output = check_output(config.output, config.overwrite)
    device = resolve_device(config.device)
    infos = inspect_images([str(p) for p in config.rasters], config.bands, config.window)
    torch.manual_seed(config.seed)
    model = MaskedReconstruction(config.backbone, len(infos[0].bands)).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, round(0.05 * config.steps))
    scheduler = LambdaLR(
        optimizer, lambda step: lr_factor(step, config.steps, config.steps, 0.9, 1, 1.0, warmup)
    )
    log.info(
        "pre-training %s on %d raster(s), bands %s: %d steps of %d windows of %d px, "
        "%.0f%% of 16 px patches masked, on %s",
        config.backbone,
        len(infos),
        list(infos[0].bands),
        config.steps,
        config.batch_size,
        config.window,
        100 * config.mask_ratio,
        device,
    )
    started = time.perf_counter()
    losses: list[float] = []
    with contextlib.ExitStack() as stack:
        datasets = [stack.enter_context(open_raster(i.path)) for i in infos]
        windows = _Windows(config, infos, datasets, np.random.default_rng([config.seed, 2]))
        bar = progress(range(config.steps), desc="pretrain", unit="step")
        for step in bar:
            batch = windows.batch(config.batch_size, config.mask_ratio)
            loss = model(*(t.to(device) for t in batch))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise GeosegError(
                    f"pre-training stopped: the loss became {value} at step {step + 1}; lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(value)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}")
    seconds = time.perf_counter() - started
    state = {k: v.detach().cpu().contiguous() for k, v in model.trunk.state_dict().items()}
    with atomic_output(output, config.overwrite) as tmp:
        torch.save(state, tmp)
    head = np.mean(losses[: max(1, len(losses) // 20)])
    tail = np.mean(losses[-max(1, len(losses) // 20) :])
    log.info(
        "wrote %s (%s backbone, %d bands): reconstruction error %.4f -> %.4f in %.0f s",
        output,
        config.backbone,
        len(infos[0].bands),
        head,
        tail,
        seconds,
    )
    return PretrainResult(output, config.steps, float(head), float(tail), seconds, losses)
