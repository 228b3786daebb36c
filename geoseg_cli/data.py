"""Training data: the chips of a ``geoseg tile`` folder as a torch Dataset, standardized."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from geoseg_cli.chips import ChipRecord, ChipStats
from geoseg_cli.errors import InputError
from geoseg_cli.raster import read_masked
from geoseg_cli.train_config import TrainConfig
from models import OUTPUT_STRIDE


def ceil_to_stride(size: int) -> int:
    """The smallest multiple of the network's output stride that is ≥ ``size``."""
    return -(-size // OUTPUT_STRIDE) * OUTPUT_STRIDE


class ChipDataset(Dataset):
    """Standardized image chips and labels, cropped or padded to ``size``.

    Items are ``(image, label)``: float32 C×size×size and int64 size×size. The model sees
    ``(raw · scale − mean) / std`` per band, what the inference graph computes from
    ``raw · scale``. A chip larger than ``size`` is cropped (at a random place with
    ``random_crop``, else centred); a smaller one is padded (image 0 after standardization,
    label ``ignore_index``), and so are values that are not finite (NaN, ±inf: nodata) of
    float chips. Augmentations are drawn from a generator seeded by (seed, epoch, chip
    index), or (seed, epoch, chip index, draw) for the ``(chip index, draw)`` items a
    :class:`~geoseg_cli.sampling.ChipSampler` yields, so a batch does not depend on
    workers, ranks or a resume and a chip drawn twice gets two sets of augmentations.

    Args:
        chips_dir: The chips folder.
        records: The chips.
        stats: Statistics of the chip folder (scaling, classes, ignore index).
        size: Output size in pixels.
        random_crop: Crop larger chips at a random place.
        flips: Random horizontal and vertical flips (p = 0.5 each).
        rot90: Random rotation by 90°, 180° or 270° (p = 0.5 of any turn).
        scale_jitter: Zoom by a log-uniform factor in [1/(1+s), 1+s] (bilinear image,
            nearest labels); 0 keeps the resolution.
        color_jitter: Per band, multiply by a gain in [1-j, 1+j] and add an offset in
            [-j, j] (standardized units, so the same for any band count and dtype).
        seed: Seed of the random draws.
    """

    def __init__(
        self,
        chips_dir: str | os.PathLike,
        records: Sequence[ChipRecord],
        stats: ChipStats,
        size: int,
        *,
        random_crop: bool = False,
        flips: bool = False,
        rot90: bool = False,
        scale_jitter: float = 0.0,
        color_jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.chips_dir = Path(chips_dir)
        self.records = list(records)
        self.stats = stats
        self.size = size
        self.random_crop = random_crop
        self.flips = flips
        self.rot90 = rot90
        self.scale_jitter = scale_jitter
        self.color_jitter = color_jitter
        self.seed = seed
        self.epoch = 0
        spec = stats.input
        self._scale = np.float32(spec.scale)
        self._mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(spec.std, dtype=np.float32)[:, None, None]

    @classmethod
    def for_training(
        cls, config: TrainConfig, records: Sequence[ChipRecord], stats: ChipStats
    ) -> ChipDataset:
        """The training set of a run: random crops and the config's augmentations."""
        return cls(
            config.chips_dir,
            records,
            stats,
            config.window,
            random_crop=True,
            flips=config.flips,
            rot90=config.rot90,
            scale_jitter=config.scale_jitter,
            color_jitter=config.color_jitter,
            seed=config.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        key = index if isinstance(index, tuple) else (index,)
        image, label = self._read(self.records[key[0]])
        rng = np.random.default_rng((self.seed, self.epoch, *key))
        image, label = self._fit(image, label, rng)
        if self.flips:
            if rng.random() < 0.5:
                image, label = image[:, :, ::-1], label[:, ::-1]
            if rng.random() < 0.5:
                image, label = image[:, ::-1, :], label[::-1, :]
        if self.rot90 and rng.random() < 0.5:
            turns = int(rng.integers(1, 4))
            image = np.rot90(image, turns, axes=(1, 2))
            label = np.rot90(label, turns)
        if self.color_jitter:
            bands = (image.shape[0], 1, 1)
            gain = rng.uniform(1 - self.color_jitter, 1 + self.color_jitter, bands)
            offset = rng.uniform(-self.color_jitter, self.color_jitter, bands)
            image = (image * gain + offset).astype(np.float32)
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
        )

    def _read(self, record: ChipRecord) -> tuple[np.ndarray, np.ndarray]:
        raw, _, label = read_chip(self.chips_dir, record, self.stats)
        with np.errstate(over="ignore"):  # train names chips whose values overflow
            image = (raw.astype(np.float32) * self._scale - self._mean) / self._std
        if raw.dtype.kind == "f":  # NaN and ±inf are nodata: 0 after standardization, ignored
            bad = ~np.isfinite(raw)
            if bad.any():
                image[bad] = 0
                label = np.where(bad.any(axis=0), self.stats.ignore_index, label)
        return image, label

    def _fit(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Crop (and zoom, with ``scale_jitter``) or pad to ``size`` × ``size``."""
        height, width = label.shape
        size = self.size
        zoom = 1.0
        if self.scale_jitter:
            zoom = math.exp(rng.uniform(-1, 1) * math.log1p(self.scale_jitter))
        side = round(size / zoom)  # the chip pixels that become the window
        if height > side or width > side:
            if self.random_crop:
                top = int(rng.integers(0, max(height - side, 0) + 1))
                left = int(rng.integers(0, max(width - side, 0) + 1))
            else:
                top, left = max(height - side, 0) // 2, max(width - side, 0) // 2
            image = image[:, top : top + side, left : left + side]
            label = label[top : top + side, left : left + side]
            height, width = label.shape
        if zoom != 1.0:
            shape = (min(round(height * zoom), size), min(round(width * zoom), size))
            image, label = _resize(image, label, shape)
            height, width = shape
        if height < size or width < size:
            pad = ((0, size - height), (0, size - width))
            image = np.pad(image, ((0, 0), *pad))
            label = np.pad(label, pad, constant_values=self.stats.ignore_index)
        return image, label


def _resize(
    image: np.ndarray, label: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a chip to ``shape``: the image bilinearly (antialiased), labels nearest."""
    pixels = torch.from_numpy(np.ascontiguousarray(image))[None]
    resized = F.interpolate(pixels, shape, mode="bilinear", align_corners=False, antialias=True)
    classes = torch.from_numpy(label.astype(np.float32))[None, None]
    ids = F.interpolate(classes, shape, mode="nearest-exact")[0, 0].numpy()
    return resized[0].numpy(), ids.astype(label.dtype)


def read_chip(
    chips_dir: str | os.PathLike, record: ChipRecord, stats: ChipStats
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chip's raw bands (C×H×W), valid-data mask (H×W) and labels (H×W), checked.

    Raises:
        InputError: A chip file is missing or unreadable, or does not fit stats.json.
    """
    bands = len(stats.input.bands)
    image_path, label_path = record.image(chips_dir), record.label(chips_dir)
    try:
        with rasterio.open(image_path) as src:
            raw, valid = read_masked(src)
        with rasterio.open(label_path) as src:
            label = src.read(1)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(
            f"chip {record.chip_id}: {str(exc).splitlines()[0]}; re-run geoseg tile"
        ) from exc
    if raw.shape[0] != bands:
        raise InputError(
            f"{image_path}: {raw.shape[0]} bands but stats.json lists {bands}; re-run geoseg tile"
        )
    if label.shape != raw.shape[1:]:
        raise InputError(f"{label_path}: size differs from its image chip; re-run tile")
    num_classes = len(stats.classes)
    bad = (label >= num_classes) & (label != stats.ignore_index)
    if bad.any():
        raise InputError(
            f"{label_path}: label values {np.unique(label[bad])[:5].tolist()} are "
            f"outside the {num_classes} classes; re-run geoseg tile"
        )
    return raw, valid, label
