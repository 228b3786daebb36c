"""The chips-folder contract between ``geoseg tile`` and ``train``: manifest and statistics."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoseg_cli.checkpoint import InputSpec
from geoseg_cli.classes import ClassInfo
from geoseg_cli.distributed import torchrun_env
from geoseg_cli.errors import InputError

log = logging.getLogger(__name__)

#: Version of the stats.json layout.
FORMAT_VERSION = 1
MANIFEST = "manifest.csv"
STATS = "stats.json"
IMAGES = "images"
LABELS = "labels"
#: Validation splits a chip may be in.
SPLIT_NAMES = ("train", "val")
_COLUMNS = ("chip_id", "image", "label", "source", "col_off", "row_off", "width", "height")


@dataclass
class ChipRecord:
    """One chip: one row of ``manifest.csv``.

    Attributes:
        chip_id: File stem of the chip's image and label.
        source: The image raster it was cut from.
        col_off: Column of its window in the source.
        row_off: Row of its window in the source.
        width: Window width in pixels.
        height: Window height in pixels.
        split: ``train`` or ``val``.
        nodata_fraction: Share of its pixels that are nodata.
        counts: Labelled pixels per class.
    """

    chip_id: str
    source: str
    col_off: int
    row_off: int
    width: int
    height: int
    split: str = "train"
    nodata_fraction: float = 0.0
    counts: list[int] = field(default_factory=list)

    def image(self, chips_dir: str | os.PathLike) -> Path:
        """The image chip's path inside ``chips_dir``."""
        return Path(chips_dir) / IMAGES / f"{self.chip_id}.tif"

    def label(self, chips_dir: str | os.PathLike) -> Path:
        """The label chip's path inside ``chips_dir``."""
        return Path(chips_dir) / LABELS / f"{self.chip_id}.tif"


@dataclass(frozen=True)
class ChipStats:
    """The content of ``stats.json``.

    Attributes:
        input: Bands, dtype, scale, mean/std (of the train chips), nodata and resolution.
        classes: Class names and colours.
        ignore_index: Label value of unlabelled pixels.
        class_counts: Labelled train pixels per class.
        class_frequencies: Their shares.
        class_weights: Median-frequency weights for weighted cross-entropy.
        size: Chip size in pixels.
        stride: Grid step, or None for random chips.
        crs: WKT of the source CRS, or None.
        num_chips: Chips per split.
        sparse: The labels are sparse points and scribbles (``geoseg tile --sparse``).
        coverage: Share of the train chips' pixels that hold a label (None: not recorded).
        pseudolabel: How ``geoseg pseudolabel`` completed the labels, or None.
    """

    input: InputSpec
    classes: list[ClassInfo]
    ignore_index: int
    class_counts: list[int]
    class_frequencies: list[float]
    class_weights: list[float]
    size: int
    stride: int | None = None
    crs: str | None = None
    num_chips: dict[str, int] = field(default_factory=dict)
    sparse: bool = False
    coverage: float | None = None
    pseudolabel: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to ``stats.json``."""
        spec = self.input
        return {
            "format_version": FORMAT_VERSION,
            "bands": spec.bands,
            "dtype": spec.dtype,
            "scale": spec.scale,
            "mean": spec.mean,
            "std": spec.std,
            "nodata": spec.nodata,
            "resolution": spec.resolution,
            "crs": self.crs,
            "classes": [c.describe() for c in self.classes],
            "ignore_index": self.ignore_index,
            "class_counts": self.class_counts,
            "class_frequencies": self.class_frequencies,
            "class_weights": self.class_weights,
            "size": self.size,
            "stride": self.stride,
            "num_chips": self.num_chips,
            "sparse": self.sparse,
            "coverage": self.coverage,
            **({} if self.pseudolabel is None else {"pseudolabel": self.pseudolabel}),
        }


def class_weights(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """Class frequencies and median-frequency weights (median / frequency; 0 if absent)."""
    total = counts.sum()
    freq = counts / total if total else np.zeros(len(counts))
    present = freq > 0
    weights = np.zeros(len(counts))
    if present.any():
        weights[present] = np.median(freq[present]) / freq[present]
    return freq.tolist(), weights.tolist()


def label_stats(records: Sequence[ChipRecord], num_classes: int) -> dict[str, Any]:
    """The :class:`ChipStats` fields that the chips' class counts give.

    Class counts, frequencies and weights of the train chips, chips per split, and the
    coverage: the share of the train chips' pixels that hold a class label.
    """
    train = [r for r in records if r.split == "train"]
    counts = np.zeros(num_classes, dtype=np.int64)
    for record in train:
        counts += record.counts
    frequencies, weights = class_weights(counts)
    return {
        "class_counts": counts.tolist(),
        "class_frequencies": frequencies,
        "class_weights": weights,
        "num_chips": {"train": len(train), "val": len(records) - len(train)},
        "coverage": int(counts.sum()) / max(sum(r.width * r.height for r in train), 1),
    }


def write_chips_index(
    chips_dir: str | os.PathLike, records: Sequence[ChipRecord], stats: ChipStats
) -> None:
    """Write ``manifest.csv`` and ``stats.json`` into ``chips_dir``.

    Layout::

        CHIPS_DIR/images/<chip_id>.tif   image chip: selected bands, source dtype, window transform
        CHIPS_DIR/labels/<chip_id>.tif   class ids (uint8, uint16 above 255), nodata = ignore index
        CHIPS_DIR/manifest.csv           one row per chip (:class:`ChipRecord`)
        CHIPS_DIR/stats.json             scaling, classes and class weights (:class:`ChipStats`)
    """
    chips_dir = Path(chips_dir)
    names = [c.name for c in stats.classes]
    with open(chips_dir / MANIFEST, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*_COLUMNS, "split", "nodata_fraction"] + [f"count_{n}" for n in names])
        for r in records:
            writer.writerow(
                [
                    r.chip_id,
                    f"{IMAGES}/{r.chip_id}.tif",
                    f"{LABELS}/{r.chip_id}.tif",
                    r.source,
                    r.col_off,
                    r.row_off,
                    r.width,
                    r.height,
                    r.split,
                    round(r.nodata_fraction, 6),
                    *r.counts,
                ]
            )
    text = json.dumps(stats.to_dict(), indent=2) + "\n"
    (chips_dir / STATS).write_text(text, encoding="utf-8")


def load_stats(chips_dir: str | os.PathLike) -> ChipStats:
    """Read and validate ``CHIPS_DIR/stats.json``.

    Args:
        chips_dir: A folder written by ``geoseg tile``, or its ``stats.json``.

    Raises:
        InputError: Missing, unreadable or inconsistent statistics.
    """
    path = Path(chips_dir)
    path = path if path.suffix.lower() == ".json" else path / STATS
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a folder written by geoseg tile (CHIPS_DIR)")
    try:
        data = json.loads(path.read_text())
        version = data.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise InputError(f"{path}: stats format {version} is newer than this geoseg; upgrade")
        spec = InputSpec(
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
        ones = [1.0] * len(classes)
        stats = ChipStats(
            input=spec,
            classes=classes,
            ignore_index=int(data["ignore_index"]),
            class_counts=[int(n) for n in data.get("class_counts") or [0] * len(classes)],
            class_frequencies=[float(f) for f in data.get("class_frequencies") or ones],
            class_weights=[float(w) for w in data.get("class_weights") or ones],
            size=int(data["size"]),
            stride=None if data.get("stride") is None else int(data["stride"]),
            crs=data.get("crs"),
            num_chips={str(k): int(v) for k, v in (data.get("num_chips") or {}).items()},
            sparse=bool(data.get("sparse", False)),
            coverage=None if data.get("coverage") is None else float(data["coverage"]),
            pseudolabel=data.get("pseudolabel"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(
            f"{path}: malformed statistics ({type(exc).__name__}: {exc}); re-run geoseg tile"
        ) from exc
    if not len(spec.bands) == len(spec.mean) == len(spec.std):
        raise InputError(f"{path}: bands, mean and std differ in length; re-run geoseg tile")
    if any(s <= 0 for s in spec.std):
        raise InputError(f"{path}: a band has std ≤ 0 (constant band?); drop it with -b")
    if len(stats.class_weights) != len(classes) or not classes:
        raise InputError(f"{path}: class_weights do not match the classes; re-run geoseg tile")
    return stats


def read_manifest(chips_dir: str | os.PathLike) -> list[ChipRecord]:
    """The rows of ``CHIPS_DIR/manifest.csv``.

    Raises:
        InputError: Missing manifest, missing columns or an unknown split.
    """
    path = Path(chips_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a folder written by geoseg tile")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    records = []
    for line, row in enumerate(rows, start=2):
        try:
            record = ChipRecord(
                chip_id=row["chip_id"],
                source=row["source"],
                col_off=int(row["col_off"]),
                row_off=int(row["row_off"]),
                width=int(row["width"]),
                height=int(row["height"]),
                split=row["split"],
                nodata_fraction=float(row["nodata_fraction"]),
                counts=[int(v) for k, v in row.items() if k.startswith("count_")],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}, line {line}: malformed row ({exc}); re-run geoseg tile"
            ) from exc
        if record.split not in SPLIT_NAMES:
            raise InputError(
                f"{path}, line {line}: split {record.split!r} is neither train nor val"
            )
        records.append(record)
    return records


def load_training_chips(
    chips_dir: str | os.PathLike, loss: str | None = None
) -> tuple[ChipStats, list[ChipRecord], list[ChipRecord]]:
    """The statistics, train chips and val chips of a folder that training can use.

    Args:
        chips_dir: The chips folder.
        loss: The training loss kind, checked against sparse labels (None: not checked).

    Raises:
        InputError: The folder is unreadable, lacks a split, has fewer than two classes, or
            holds sparse labels and ``loss`` needs dense ones.
    """
    stats = load_stats(chips_dir)
    if loss is not None and stats.sparse:
        check_sparse_loss(stats, loss, chips_dir)
    records = read_manifest(chips_dir)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not train or not val:
        raise InputError(
            f"{Path(chips_dir) / MANIFEST}: {len(train)} train and {len(val)} val chips; "
            "training needs both (re-tile with a val split)"
        )
    if len(stats.classes) < 2:
        raise InputError(
            f"{Path(chips_dir) / STATS}: one class ({stats.classes[0].name}); segmentation "
            "needs at least two. Re-tile with a classes file that maps every label value "
            "(e.g. value = 255 for a 0/255 mask), or another --ignore-index"
        )
    return stats, train, val


def check_sparse_loss(stats: ChipStats, loss: str, chips_dir: str | os.PathLike) -> None:
    """Refuse a loss that needs dense labels on sparse chips; warn for plain cross-entropy.

    Dice compares predicted and labelled class areas, which a few labelled pixels per chip
    do not have, and nothing would speak for the unlabelled pixels.

    Raises:
        InputError: ``loss`` is Dice or Dice+CE.
    """
    from models.losses import DENSE_LOSSES  # PyTorch: tile and evaluate never import it

    share = "" if stats.coverage is None else f" ({100 * stats.coverage:.2f}% of pixels labelled)"
    if loss in DENSE_LOSSES:
        raise InputError(
            f"{chips_dir} holds sparse labels{share} and --loss {loss} needs dense ones: train "
            f"with --loss partial, or complete them first with `geoseg pseudolabel {chips_dir} "
            f"-o DENSE_DIR` (--loss ce trains plain cross-entropy on the labelled pixels)"
        )
    if not torchrun_env().is_main:
        return
    if loss == "ce":
        log.warning(
            "%s holds sparse labels%s: plain cross-entropy learns from the labelled pixels "
            "only; --loss partial also regularises the unlabelled ones",
            chips_dir,
            share,
        )
    log.info("validation scores count the sparse labelled pixels of the val chips only")
