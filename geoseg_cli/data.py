"""Training data: the ``geoseg tile`` output folder (chips, manifest, stats) as torch Datasets.

Folder contract (written by ``geoseg tile``)::

    CHIPS_DIR/images/<chip_id>.tif   image chip, selected bands, source dtype
    CHIPS_DIR/labels/<chip_id>.tif   uint8 class ids, ignore_index where unlabelled/nodata
    CHIPS_DIR/manifest.csv           chip_id,image,label,source,col_off,row_off,width,height,
                                     split,nodata_fraction,count_<class>...
    CHIPS_DIR/stats.json             bands, dtype, scale, mean, std, nodata, resolution, crs,
                                     classes, ignore_index, class_weights, size, stride ...

The model sees ``(raw · scale − mean) / std`` per band: exactly what
:class:`~geoseg_cli.engine.InferenceModel` computes from ``raw · scale`` at inference.
Augmentations are drawn from a generator seeded by (seed, epoch, chip index), so a batch
does not depend on worker processes, ranks or where a resumed run restarted.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch.utils.data import Dataset

from geoseg_cli.checkpoint import ClassInfo, InputSpec
from geoseg_cli.errors import InputError

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChipStats:
    """The parts of ``stats.json`` that training needs.

    Attributes:
        input: Bands, dtype, scale, mean/std, nodata and resolution (the checkpoint's input).
        classes: Class names and colours.
        ignore_index: Label value of unlabelled pixels.
        class_weights: Per-class weights for weighted cross-entropy.
        size: Chip size in pixels.
    """

    input: InputSpec
    classes: list[ClassInfo]
    ignore_index: int
    class_weights: list[float]
    size: int


@dataclass(frozen=True)
class ChipRecord:
    """One row of ``manifest.csv``."""

    chip_id: str
    image: Path
    label: Path
    split: str
    width: int
    height: int


def load_stats(chips_dir: str | os.PathLike) -> ChipStats:
    """Read and validate ``CHIPS_DIR/stats.json``.

    Args:
        chips_dir: A folder written by ``geoseg tile``, or its ``stats.json``.

    Raises:
        InputError: Missing, unreadable or inconsistent statistics.
    """
    path = Path(chips_dir)
    path = path if path.suffix.lower() == ".json" else path / "stats.json"
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a folder written by geoseg tile (CHIPS_DIR)")
    try:
        data = json.loads(path.read_text())
        version = data.get("format_version", 1)
        if version > STATS_FORMAT_VERSION:
            raise InputError(f"{path}: stats format {version} is newer than this geoseg; upgrade")
        input_spec = InputSpec(
            bands=[int(b) for b in data["bands"]],
            dtype=str(data["dtype"]),
            scale=float(data["scale"]),
            mean=[float(v) for v in data["mean"]],
            std=[float(v) for v in data["std"]],
            nodata=None if data.get("nodata") is None else float(data["nodata"]),
            resolution=None if data.get("resolution") is None else float(data["resolution"]),
        )
        classes = [
            ClassInfo(str(c["name"]), tuple(int(v) for v in c["color"])) for c in data["classes"]
        ]
        stats = ChipStats(
            input=input_spec,
            classes=classes,
            ignore_index=int(data["ignore_index"]),
            class_weights=[float(w) for w in data.get("class_weights") or [1.0] * len(classes)],
            size=int(data["size"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(
            f"{path}: malformed statistics ({type(exc).__name__}: {exc}); re-run geoseg tile"
        ) from exc
    if not len(input_spec.bands) == len(input_spec.mean) == len(input_spec.std):
        raise InputError(f"{path}: bands, mean and std differ in length; re-run geoseg tile")
    if any(s <= 0 for s in input_spec.std):
        raise InputError(f"{path}: a band has std ≤ 0 (constant band?); drop it with -b")
    if len(stats.class_weights) != len(classes) or not classes:
        raise InputError(f"{path}: class_weights do not match the classes; re-run geoseg tile")
    return stats


def read_manifest(chips_dir: str | os.PathLike) -> list[ChipRecord]:
    """Rows of ``CHIPS_DIR/manifest.csv`` with paths resolved against ``chips_dir``.

    Raises:
        InputError: Missing manifest, missing columns or an unknown split.
    """
    chips_dir = Path(chips_dir)
    path = chips_dir / "manifest.csv"
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a folder written by geoseg tile")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    records = []
    for line, row in enumerate(rows, start=2):
        try:
            record = ChipRecord(
                chip_id=row["chip_id"],
                image=chips_dir / row["image"],
                label=chips_dir / row["label"],
                split=row["split"],
                width=int(row["width"]),
                height=int(row["height"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}, line {line}: malformed row ({exc}); re-run geoseg tile"
            ) from exc
        if record.split not in ("train", "val"):
            raise InputError(
                f"{path}, line {line}: split {record.split!r} is neither train nor val"
            )
        records.append(record)
    return records


def ceil16(size: int) -> int:
    """The smallest multiple of 16 (the network's stride) that is ≥ ``size``."""
    return -(-size // 16) * 16


class ChipDataset(Dataset):
    """Standardized image chips and labels, cropped or padded to ``size``.

    Items are ``(image, label)``: float32 C×size×size and int64 size×size. A chip larger
    than ``size`` is cropped (at a random place with ``random_crop``, else centred); a
    smaller one is padded (image 0 after standardization, label ``ignore_index``).

    Args:
        records: The chips.
        stats: Statistics of the chip folder (scaling, classes, ignore index).
        size: Output size in pixels.
        random_crop: Crop larger chips at a random place.
        flips: Random horizontal and vertical flips (p = 0.5 each).
        rot90: Random rotation by 90°, 180° or 270° (p = 0.5 of any turn).
        seed: Seed of the random draws.
    """

    def __init__(
        self,
        records: Sequence[ChipRecord],
        stats: ChipStats,
        size: int,
        *,
        random_crop: bool = False,
        flips: bool = False,
        rot90: bool = False,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.stats = stats
        self.size = size
        self.random_crop = random_crop
        self.flips = flips
        self.rot90 = rot90
        self.seed = seed
        self.epoch = 0
        spec = stats.input
        self._scale = np.float32(spec.scale)
        self._mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(spec.std, dtype=np.float32)[:, None, None]

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[index]
        image, label = self._read(record)
        rng = np.random.default_rng((self.seed, self.epoch, index))
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
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
        )

    def _read(self, record: ChipRecord) -> tuple[np.ndarray, np.ndarray]:
        bands = len(self.stats.input.bands)
        try:
            with rasterio.open(record.image) as src:
                raw = src.read()
            with rasterio.open(record.label) as src:
                label = src.read(1)
        except rasterio.errors.RasterioIOError as exc:
            raise InputError(
                f"chip {record.chip_id}: {str(exc).splitlines()[0]}; re-run geoseg tile"
            ) from exc
        if raw.shape[0] != bands:
            raise InputError(
                f"{record.image}: {raw.shape[0]} bands but stats.json lists {bands}; "
                "re-run geoseg tile"
            )
        if label.shape != raw.shape[1:]:
            raise InputError(f"{record.label}: size differs from its image chip; re-run tile")
        num_classes = len(self.stats.classes)
        bad = (label >= num_classes) & (label != self.stats.ignore_index)
        if bad.any():
            raise InputError(
                f"{record.label}: label values {np.unique(label[bad])[:5].tolist()} are "
                f"outside the {num_classes} classes; re-run geoseg tile"
            )
        image = (raw.astype(np.float32) * self._scale - self._mean) / self._std
        return image, label

    def _fit(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Crop or pad to ``size`` × ``size``."""
        height, width = label.shape
        size = self.size
        if height > size or width > size:
            if self.random_crop:
                top = int(rng.integers(0, max(height - size, 0) + 1))
                left = int(rng.integers(0, max(width - size, 0) + 1))
            else:
                top, left = max(height - size, 0) // 2, max(width - size, 0) // 2
            image = image[:, top : top + size, left : left + size]
            label = label[top : top + size, left : left + size]
            height, width = label.shape
        if height < size or width < size:
            pad = ((0, size - height), (0, size - width))
            image = np.pad(image, ((0, 0), *pad))
            label = np.pad(label, pad, constant_values=self.stats.ignore_index)
        return image, label
