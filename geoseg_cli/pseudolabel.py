"""``geoseg pseudolabel``: complete sparse label chips by graph propagation (after WSGCN)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from torch.nn import functional as F

from geoseg_cli.checkpoint import InputSpec, build_model, load_checkpoint
from geoseg_cli.chips import (
    IMAGES,
    LABELS,
    ChipRecord,
    ChipStats,
    label_stats,
    load_stats,
    read_manifest,
    write_chips_index,
)
from geoseg_cli.data import read_chip
from geoseg_cli.distributed import resolve_device
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.pixel_graph import KNN, build_graph
from geoseg_cli.progress import progress
from geoseg_cli.raster import atomic_output
from models import OUTPUT_STRIDE
from models.partial import SIGMA_COLOR
from models.wsgcn import GraphBatch, PropagationConfig, propagate

log = logging.getLogger(__name__)

#: Default confidence below which a pixel stays unlabelled.
CONFIDENCE = 0.8
#: Default pixels per node side (a divisor of the backbone's stride 16).
REDUCTION = 4
#: Default chips propagated together (one block-diagonal graph).
BATCH_SIZE = 4
#: Position scale σ_xy of the graph affinities, in pixels.
SIGMA_XY = 16.0
#: Scale of the (L2-normalized) backbone features in the affinities.
SIGMA_FEATURE = 0.5
#: Node-feature channels besides the bands and backbone features: row and column.
POSITION_CHANNELS = 2


@dataclass(frozen=True)
class PseudolabelConfig:
    """Settings of :func:`pseudolabel`.

    Attributes:
        confidence: Pixels whose top class probability is below this stay unlabelled.
        model: Checkpoint whose backbone adds node features, or None.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Chips propagated together.
        seed: Seed of the GCN initialisation (with each chip's id).
        reduction: Pixels per node side: 1, 2, 4, 8 or 16.
        k: Affinity edges per node.
        propagation: How each chip's GCN trains.
    """

    confidence: float = CONFIDENCE
    model: Path | None = None
    device: str = "auto"
    batch_size: int = BATCH_SIZE
    seed: int = 0
    reduction: int = REDUCTION
    k: int = KNN
    propagation: PropagationConfig = field(default_factory=PropagationConfig)

    def validate(self) -> None:
        """Check the settings.

        Raises:
            UsageError: An out-of-range setting.
        """
        if not 0 <= self.confidence <= 1:
            raise UsageError(f"--confidence must be in [0, 1], not {self.confidence}")
        if self.reduction < 1 or OUTPUT_STRIDE % self.reduction:
            raise UsageError(f"reduction must divide {OUTPUT_STRIDE}, not {self.reduction}")
        if self.batch_size < 1 or self.k < 0 or self.propagation.steps < 1:
            raise UsageError("batch size and steps must be ≥ 1, k ≥ 0")


@dataclass
class PseudolabelSummary:
    """What :func:`pseudolabel` wrote."""

    output: str
    num_chips: dict[str, int]
    skipped: int
    seed_coverage: float | None
    coverage: float
    classes: list[str]
    class_counts: list[int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (``geoseg pseudolabel --json``)."""
        return dict(self.__dict__)


@dataclass
class _Chip:
    record: ChipRecord
    image: np.ndarray  # C×H×W raw values as float32
    valid: np.ndarray  # H×W
    labels: np.ndarray  # H×W class ids / ignore


def _standardize(raw: np.ndarray, valid: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(raw · scale − mean) / std per band; nodata pixels 0 (the mean)."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return np.where(valid, (raw * np.float32(spec.scale) - mean) / std, 0).astype(np.float32)


def _pad_to(array: np.ndarray, multiple: int, value: float | None = None) -> np.ndarray:
    """Pad the last two axes at the bottom/right to multiples of ``multiple``.

    The padding repeats the edge values, or is ``value`` when given.
    """
    rows, cols = array.shape[-2:]
    pad = [(0, 0)] * (array.ndim - 2) + [(0, -rows % multiple), (0, -cols % multiple)]
    if value is None:
        return np.pad(array, pad, mode="edge")
    return np.pad(array, pad, constant_values=value)


def _cells(array: np.ndarray, reduction: int) -> np.ndarray:
    """…×H×W (H, W multiples of ``reduction``) → …×h×w×r×r blocks of the cells."""
    *lead, rows, cols = array.shape
    blocks = array.reshape(*lead, rows // reduction, reduction, cols // reduction, reduction)
    return np.moveaxis(blocks, -3, -2)


def node_seeds(labels: np.ndarray, num_classes: int, ignore: int, reduction: int) -> np.ndarray:
    """Seed class of every cell (the most frequent labelled class in it), −1 for none.

    Returns:
        h×w int64.
    """
    cells = _cells(_pad_to(labels, reduction, ignore), reduction)
    counts = np.stack([(cells == c).sum((-2, -1)) for c in range(num_classes)], -1)
    return np.where(counts.sum(-1) > 0, counts.argmax(-1), -1)


class _Backbone:
    """The trunk of a checkpoint, producing L2-normalized features per cell."""

    def __init__(self, path: Path, stats: ChipStats, device: torch.device) -> None:
        ckpt = load_checkpoint(path)
        if len(ckpt.input.bands) != len(stats.input.bands):
            raise InputError(
                f"{path} takes {len(ckpt.input.bands)} band(s) but the chips have "
                f"{len(stats.input.bands)}; give a model trained on chips of these bands"
            )
        self.spec = ckpt.input
        self.trunk = build_model(ckpt).backbone.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, chips: list[_Chip], reduction: int) -> torch.Tensor:
        """B×Cf×h×w features of same-sized chips on the cell grid."""
        batch = np.stack([_standardize(c.image, c.valid, self.spec) for c in chips])
        rows, cols = batch.shape[-2:]
        x = torch.from_numpy(_pad_to(batch, OUTPUT_STRIDE)).to(self.device)
        features = self.trunk(x)
        cells = (x.shape[-2] // reduction, x.shape[-1] // reduction)
        features = F.interpolate(features, cells, mode="bilinear", align_corners=False)
        features = F.normalize(features, dim=1)
        return features[..., : -(-rows // reduction), : -(-cols // reduction)]


def _node_features(
    chips: list[_Chip], stats: ChipStats, reduction: int, backbone: _Backbone | None
) -> tuple[np.ndarray, np.ndarray]:
    """GCN inputs B×h×w×F and scaled affinity features B×h×w×F' of same-sized chips."""
    cells = np.stack(
        [
            _cells(_pad_to(_standardize(c.image, c.valid, stats.input), reduction), reduction)
            for c in chips
        ]
    )
    colour = np.moveaxis(cells.mean((-2, -1)), 1, -1)  # B×h×w×C
    texture = np.moveaxis(cells.std((-2, -1)), 1, -1)
    batch, rows, cols, _ = colour.shape
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    position = (np.stack([yy, xx], -1).astype(np.float32) + 0.5) * reduction  # pixels
    position = np.broadcast_to(position, (batch, rows, cols, POSITION_CHANNELS))
    extent = reduction * max(rows, cols)
    inputs = [colour, texture, position / extent]
    scaled = [colour / SIGMA_COLOR, position / SIGMA_XY]
    if backbone is not None:
        deep = np.moveaxis(backbone(chips, reduction).cpu().numpy(), 1, -1)
        inputs.append(deep)
        scaled.append(deep / SIGMA_FEATURE)
    return (
        np.concatenate(inputs, -1).astype(np.float32),
        np.concatenate(scaled, -1).astype(np.float32),
    )


def _generator(seed: int, chip_id: str) -> torch.Generator:
    """The chip's own generator, so its result depends on the seed and the chip only.

    Not on the batch it shares or its place in the folder.
    """
    return torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(chip_id.encode()))


def _propagate_batch(
    chips: list[_Chip],
    stats: ChipStats,
    config: PseudolabelConfig,
    backbone: _Backbone | None,
    device: torch.device,
) -> list[np.ndarray]:
    """Pseudo-labels (H×W, ignore below the confidence) of same-sized chips."""
    r = config.reduction
    ignore = stats.ignore_index
    num_classes = len(stats.classes)
    inputs, scaled = _node_features(chips, stats, r, backbone)
    batch, rows, cols, _ = inputs.shape
    nodes = rows * cols
    graphs = [build_graph(s, config.k) for s in scaled]

    def joined(part: str, shift: bool) -> torch.Tensor:
        arrays = [getattr(g, part) + (b * nodes if shift else 0) for b, g in enumerate(graphs)]
        return torch.from_numpy(np.concatenate(arrays)).to(device)

    graph = GraphBatch(
        joined("src", True), joined("dst", True), joined("weight", False), batch, nodes
    )
    seeds = np.stack([node_seeds(c.labels, num_classes, ignore, r) for c in chips])
    probs = propagate(
        torch.from_numpy(inputs.reshape(batch, nodes, -1)).to(device),
        graph,
        torch.from_numpy(seeds.reshape(batch, nodes)).to(device),
        num_classes,
        [_generator(config.seed, c.record.chip_id) for c in chips],
        config.propagation,
    )
    probs = probs.reshape(batch, rows, cols, num_classes).permute(0, 3, 1, 2)
    probs = F.interpolate(probs, (rows * r, cols * r), mode="bilinear", align_corners=False)
    height, width = chips[0].labels.shape
    confidence, classes = probs[..., :height, :width].max(1)
    classes = torch.where(confidence >= config.confidence, classes, ignore).cpu().numpy()
    results = []
    for chip, pseudo in zip(chips, classes, strict=True):
        seeded = chip.labels != ignore
        out = np.where(seeded, chip.labels, pseudo).astype(chip.labels.dtype)
        out[~chip.valid] = ignore
        results.append(out)
    return results


def _write_label(source: Path, target: Path, labels: np.ndarray, ignore: int) -> None:
    """Write ``labels`` on the grid and with the colour table of label chip ``source``.

    The ignore index is the nodata value.
    """
    with rasterio.open(source) as src:
        profile = src.profile | {"nodata": ignore}
        try:
            colormap = src.colormap(1)
        except ValueError:
            colormap = None
    with rasterio.open(target, "w", **profile) as dst:
        if colormap:  # before the pixels: GDAL cannot change the colour model afterwards
            dst.write_colormap(1, colormap)
        dst.write(labels, 1)


def pseudolabel(
    chips_dir: str | os.PathLike,
    outdir: str | os.PathLike,
    config: PseudolabelConfig = PseudolabelConfig(),
    *,
    overwrite: bool = False,
) -> PseudolabelSummary:
    """Complete the labels of a chips folder by per-chip graph propagation.

    For every chip of a ``geoseg tile`` folder (typically ``--sparse``):

    1. Nodes are cells of ``reduction``×``reduction`` pixels. Node features: the mean and the
       standard deviation (texture) of the chip's bands in the cell, scaled and standardized
       as stats.json says; the cell's position; and, with ``model``, the checkpoint's backbone
       features (its trunk, on the chip standardized as the checkpoint says), L2-normalized and
       resampled to the cells.
    2. A sparse graph (:mod:`geoseg_cli.pixel_graph`): 8 grid neighbours plus the top-k
       affinities in a dilated window; affinities are Gaussian over colour (the band means),
       position and backbone features.
    3. Seeds: a cell holding labelled pixels takes their most frequent class.
    4. A 2-layer GCN is trained on the chip (:func:`models.wsgcn.propagate`): cross-entropy on
       the seeded cells, entropy on the others, Laplacian smoothness over the affinities.
    5. Its probabilities are upsampled bilinearly to the chip; pixels whose top probability is
       below ``confidence`` stay the ignore index; every seed pixel keeps its label; nodata
       pixels stay ignore.

    The output folder is an ordinary ``geoseg tile`` folder: the same image chips, new label
    chips, manifest.csv with the new class counts, stats.json with the new class counts and
    weights, ``sparse`` false, the new ``coverage`` and a ``pseudolabel`` record (source folder,
    settings, seed coverage, skipped chips). Band statistics are kept from the source folder.
    Chips without a labelled pixel are left out and counted.

    Args:
        chips_dir: A ``geoseg tile`` folder (sparse labels, typically).
        outdir: New chips folder (written atomically).
        config: Settings.
        overwrite: Replace an existing output folder.

    Returns:
        Chips written and skipped, label coverage before and after, class counts.

    Raises:
        UsageError: A bad setting.
        InputError: A bad chips folder or checkpoint, or no chip with a labelled pixel.
        OutputError: The output exists (without ``overwrite``) or cannot be written.
    """
    config.validate()
    chips_dir = Path(chips_dir)
    stats = load_stats(chips_dir)
    records = read_manifest(chips_dir)
    num_classes = len(stats.classes)
    if not stats.sparse:
        log.info(
            "%s: labels are not sparse (stats.json sparse: false); completing their "
            "unlabelled pixels anyway",
            chips_dir,
        )
    device = resolve_device(config.device)
    backbone = None if config.model is None else _Backbone(config.model, stats, device)
    ignore = stats.ignore_index
    written: list[ChipRecord] = []
    skipped = 0
    with atomic_output(outdir, overwrite) as out:
        (out / IMAGES).mkdir(parents=True)
        (out / LABELS).mkdir()
        with progress(total=len(records), desc="pseudolabel", unit="chip") as bar:
            pending: list[_Chip] = []

            def flush() -> None:
                if not pending:
                    return
                for chip, labels in zip(
                    pending, _propagate_batch(pending, stats, config, backbone, device), strict=True
                ):
                    record = chip.record
                    _write_label(record.label(chips_dir), record.label(out), labels, ignore)
                    shutil.copyfile(record.image(chips_dir), record.image(out))
                    counts = np.bincount(labels[labels != ignore], minlength=num_classes)
                    written.append(dataclasses.replace(record, counts=counts.tolist()))
                bar.update(len(pending))
                pending.clear()

            for record in records:
                raw, valid, labels = read_chip(chips_dir, record, stats)
                chip = _Chip(record, raw.astype(np.float32), valid, labels)
                if not (chip.labels != ignore).any():
                    skipped += 1
                    bar.update()
                    continue
                if pending and pending[0].labels.shape != chip.labels.shape:
                    flush()
                pending.append(chip)
                if len(pending) == config.batch_size:
                    flush()
            flush()
        if not written:
            raise InputError(
                f"{chips_dir}: none of the {len(records)} chips holds a labelled pixel; "
                "nothing to propagate from"
            )
        dense = dataclasses.replace(
            stats,
            sparse=False,
            pseudolabel={
                "source": str(chips_dir),
                "seed_coverage": stats.coverage,
                "confidence": config.confidence,
                "model": None if config.model is None else str(config.model),
                "reduction": config.reduction,
                "k": config.k,
                "steps": config.propagation.steps,
                "seed": config.seed,
                "skipped": skipped,
            },
            **label_stats(written, num_classes),
        )
        write_chips_index(out, written, dense)
    summary = PseudolabelSummary(
        output=str(outdir),
        num_chips=dense.num_chips,
        skipped=skipped,
        seed_coverage=stats.coverage,
        coverage=dense.coverage,
        classes=[c.name for c in stats.classes],
        class_counts=dense.class_counts,
    )
    log.info(
        "wrote %d chips to %s: %.2f%% of the train pixels labelled (seeds: %s); skipped %d "
        "chip(s) without a labelled pixel",
        len(written),
        outdir,
        100 * summary.coverage,
        "?" if stats.coverage is None else f"{100 * stats.coverage:.2f}%",
        skipped,
    )
    return summary
