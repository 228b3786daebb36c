"""Cut images and their labels into georeferenced training chips (DESIGN.md §4)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg_cli.checkpoint import InputSpec
from geoseg_cli.chips import IMAGES, LABELS, ChipRecord, ChipStats, label_stats, write_chips_index
from geoseg_cli.classes import ClassTable
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.faults import gdal_write_errors
from geoseg_cli.image_inputs import ImageInfo, inspect_images
from geoseg_cli.labels import LabelSource, resolve_classes
from geoseg_cli.progress import progress
from geoseg_cli.raster import (
    atomic_output,
    check_output,
    ground_resolution,
    open_raster,
    read_masked,
)
from geoseg_cli.sparse import open_tile_labels
from geoseg_cli.splits import BUFFER, SPLITS, assign_splits, default_block_size, report_split
from geoseg_cli.vector import is_vector_path

log = logging.getLogger(__name__)

#: Chip size in pixels (the paper's training window).
DEFAULT_SIZE = 448
#: Chips with a larger nodata fraction are skipped.
DEFAULT_MAX_NODATA = 0.5
#: Share of validation data.
DEFAULT_VAL_FRACTION = 0.2
#: Random draws allowed per requested random chip (nodata draws are replaced).
RANDOM_ATTEMPTS = 20


def default_scale(dtype: str) -> float:
    """Factor mapping raw values to about [0, 1].

    1/255 for uint8, 1/10000 for other integers (reflectance-style uint16/int16), 1.0 for
    floating point.
    """
    kind = np.dtype(dtype)
    if kind == np.uint8:
        return 1 / 255
    return 1 / 10000 if np.issubdtype(kind, np.integer) else 1.0


def grid_offsets(length: int, size: int, stride: int) -> list[int]:
    """Window offsets along one axis; the last window is shifted to end at the edge."""
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] != length - size:
        offsets.append(length - size)
    return offsets


def grid_windows(width: int, height: int, size: int, stride: int) -> list[Window]:
    """Row-major grid of ``size``² windows every ``stride`` pixels, all inside the raster."""
    return [
        Window(col, row, size, size)
        for row in grid_offsets(height, size, stride)
        for col in grid_offsets(width, size, stride)
    ]


def random_windows(
    rng: np.random.Generator, width: int, height: int, size: int
) -> Iterator[Window]:
    """Endless distinct random ``size``² windows inside the raster (stops when exhausted)."""
    seen: set[tuple[int, int]] = set()
    total = (width - size + 1) * (height - size + 1)
    while len(seen) < total:
        col, row = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        if (col, row) not in seen:
            seen.add((col, row))
            yield Window(col, row, size, size)


@dataclass
class TileSummary:
    """What :func:`tile` wrote (``left_out``: chips dropped by the blocks split)."""

    output: str
    num_chips: dict[str, int]
    skipped: int
    sampling: str
    split: str
    classes: list[str]
    class_counts: list[int]
    left_out: int = 0
    sparse: bool = False
    unlabelled: int = 0
    coverage: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (``geoseg tile --json``)."""
        return asdict(self)


@dataclass
class _Chip:
    """A written chip: its manifest row, its image's index and its band moments."""

    record: ChipRecord
    source: int
    n: int
    mean: np.ndarray
    m2: np.ndarray


@dataclass
class _Options:
    bands: list[int]
    size: int
    max_nodata: float
    scale: float
    table: ClassTable
    sparse: bool = False


def _check_options(
    images: list[str],
    labels: list[str],
    size: int,
    stride: int,
    count: int | None,
    max_nodata: float,
    val_fraction: float,
    split: str | None,
    block_size: int | None,
) -> None:
    if not images:
        raise UsageError("give at least one image")
    if len(labels) != len(images) and not (len(labels) == 1 and is_vector_path(labels[0])):
        raise UsageError(
            f"{len(images)} image(s) but {len(labels)} label file(s); give one label file per "
            "image (in the same order), or one vector file for all images"
        )
    checks = [
        (size >= 1, f"--size must be ≥ 1, not {size}"),
        (stride >= 1, f"--stride must be ≥ 1, not {stride}"),
        (count is None or count >= 1, f"--count must be ≥ 1, not {count}"),
        (0 <= max_nodata <= 1, f"--max-nodata must be in [0, 1], not {max_nodata}"),
        (0 <= val_fraction < 1, f"--val-fraction must be in [0, 1), not {val_fraction}"),
        (split is None or split in SPLITS, f"--split must be one of {SPLITS}, not {split!r}"),
        (
            block_size is None or block_size >= size,
            f"--block-size {block_size} is smaller than a chip (--size {size})",
        ),
        (
            split != "source" or len(images) > 1 or val_fraction == 0,
            "--split source needs several images; use --split random",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


@contextlib.contextmanager
def _open_chip(
    path: Path, src: rasterio.DatasetReader, window: Window, **profile: Any
) -> Iterator[rasterio.io.DatasetWriter]:
    """Open a chip GeoTIFF for writing on ``window`` of ``src``'s grid (failures raised)."""
    with (
        gdal_write_errors(path),
        rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=int(window.width),
            height=int(window.height),
            crs=src.crs,
            transform=window_transform(window, src.transform),
            compress="deflate",
            **profile,
        ) as dst,
    ):
        yield dst


def _cut_source(
    index: int,
    image: ImageInfo,
    labels: LabelSource,
    windows: Iterator[Window],
    quota: int | None,
    out: Path,
    opts: _Options,
    bar: Any,
) -> tuple[list[_Chip], int, int]:
    """Write the chips of one image; return them and the windows skipped (nodata, no label)."""
    table = opts.table
    chips: list[_Chip] = []
    skipped = empty = unlabelled = 0
    with open_raster(image.path) as src, labels.reader(table, src) as read_labels:
        for window in windows:
            if quota is None:  # grid: the bar counts windows; random: accepted chips
                bar.update()
            data, valid = read_masked(src, window, opts.bands)
            n_valid = int(valid.sum())
            fraction = 1.0 - n_valid / valid.size
            if n_valid == 0 or fraction > opts.max_nodata:
                empty += n_valid == 0
                skipped += 1
                continue
            ids = read_labels(window)
            ids[~valid] = table.ignore_index
            labelled = ids[ids != table.ignore_index]
            if opts.sparse and not labelled.size:
                unlabelled += 1
                continue
            record = ChipRecord(
                chip_id=f"{image.prefix}_{int(window.row_off):05d}_{int(window.col_off):05d}",
                source=image.path,
                col_off=int(window.col_off),
                row_off=int(window.row_off),
                width=int(window.width),
                height=int(window.height),
                nodata_fraction=fraction,
                counts=np.bincount(labelled, minlength=len(table.classes)).tolist(),
            )
            image_profile = {"count": len(opts.bands), "dtype": image.dtype, "nodata": src.nodata}
            with _open_chip(record.image(out), src, window, **image_profile) as dst:
                dst.write(data)
                if src.nodata is None and n_valid < valid.size:
                    dst.write_mask(valid)
            label_profile = {"count": 1, "dtype": table.dtype, "nodata": table.ignore_index}
            with _open_chip(record.label(out), src, window, **label_profile) as dst:
                dst.write(ids, 1)
                if table.dtype == "uint8":
                    dst.write_colormap(1, {i: (*c.color, 255) for i, c in enumerate(table.classes)})
            scaled = data[:, valid].astype(np.float64) * opts.scale
            mean = scaled.mean(axis=1)
            m2 = ((scaled - mean[:, np.newaxis]) ** 2).sum(axis=1)
            chips.append(_Chip(record, index, n_valid, mean, m2))
            if quota is not None:
                bar.update()
                if len(chips) == quota:
                    break
    if not chips and not unlabelled:
        if empty == skipped and empty:
            raise InputError(
                f"{image.path}: every pixel is nodata in {empty} window(s); nothing to tile "
                "(remove the image or fix its nodata value)"
            )
        log.warning(
            "%s: all %d window(s) have more than %.0f%% nodata; no chips",
            image.path,
            skipped,
            opts.max_nodata * 100,
        )
    elif quota is not None and len(chips) < quota:
        log.warning("%s: only %d of %d random chips found", image.path, len(chips), quota)
    return chips, skipped, unlabelled


def _band_stats(chips: list[_Chip], bands: int) -> tuple[list[float], list[float]]:
    """Merge per-chip (n, mean, M2) of train chips (Chan et al.) into mean and std."""
    n, mean, m2 = 0, np.zeros(bands), np.zeros(bands)
    for chip in chips:
        if chip.record.split != "train":
            continue
        total = n + chip.n
        delta = chip.mean - mean
        mean = mean + delta * chip.n / total
        m2 = m2 + chip.m2 + delta**2 * n * chip.n / total
        n = total
    return mean.tolist(), np.sqrt(m2 / max(n, 1)).tolist()


def _write_index(
    out: Path,
    chips: list[_Chip],
    infos: list[ImageInfo],
    opts: _Options,
    stride: int | None,
) -> ChipStats:
    """Write manifest.csv and stats.json; return the statistics."""
    table = opts.table
    records = [c.record for c in chips]
    mean, std = _band_stats(chips, len(opts.bands))
    with open_raster(infos[0].path) as src:
        resolution, approximate = ground_resolution(src)
        nodata, crs = src.nodata, src.crs
    if approximate:
        log.info(
            "geographic CRS: resolution %.3f m is approximate (at the centre latitude)", resolution
        )
    stats = ChipStats(
        input=InputSpec(opts.bands, infos[0].dtype, opts.scale, mean, std, nodata, resolution),
        classes=table.classes,
        ignore_index=table.ignore_index,
        size=opts.size,
        stride=stride,
        crs=crs.to_wkt() if crs else None,
        sparse=opts.sparse,
        **label_stats(records, len(table.classes)),
    )
    write_chips_index(out, records, stats)
    return stats


def tile(
    images: list[str],
    labels: list[str],
    outdir: str | os.PathLike,
    *,
    size: int = DEFAULT_SIZE,
    stride: int | None = None,
    count: int | None = None,
    classes: str | os.PathLike | None = None,
    class_field: str | None = None,
    class_value: int | None = None,
    bidx: list[int] | None = None,
    max_nodata: float = DEFAULT_MAX_NODATA,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split: str | None = None,
    block_size: int | None = None,
    seed: int = 0,
    ignore_index: int | None = None,
    scale: float | None = None,
    sparse: bool = False,
    buffer: float | None = None,
    overwrite: bool = False,
) -> TileSummary:
    """Cut images and labels into georeferenced chips with a manifest and statistics.

    Args:
        images: Image rasters (anything rasterio opens).
        labels: One label source per image (same order): class-index raster, RGB-palette
            raster or vector polygons (GeoJSON; GeoPackage, Shapefile... with the optional
            ``pyogrio``); a single vector file may serve every image.
        outdir: Output folder (written atomically).
        size: Chip size in pixels.
        stride: Grid step (default: ``size``, no overlap). Ignored with ``count``.
        count: Draw this many random chips (seeded) instead of a grid.
        classes: Classes file (TOML/JSON), preset name (``isprs``) or None to infer.
        class_field: Vector attribute holding the class (number or class name).
        class_value: Class value burnt for every polygon (default 1 without ``class_field``).
        bidx: 1-based bands to keep (default: every band but alpha bands).
        max_nodata: Skip chips with a larger nodata fraction (chips without any valid pixel
            are always skipped).
        val_fraction: Share of validation data.
        split: ``"source"`` (whole images go to val), ``"blocks"`` (square blocks of
            ``block_size`` px go to val; chips that would straddle a validation and a
            training block are left out, so no pixel is in both) or ``"random"`` (single
            chips go to val; overlapping chips then share pixels across the split).
            Default: by source with several images, by blocks with one.
        block_size: Block side for ``split="blocks"`` (default: 4 × ``size``, smaller when
            that gives fewer than :data:`~geoseg_cli.splits.MIN_BLOCKS` blocks).
        seed: Seed for random chips and the split.
        ignore_index: Label id for unlabelled pixels (default: the classes file's, or 255).
        scale: Raw-value factor (default: 1/255 uint8, 1/10000 other integers, 1 float).
        sparse: The labels are sparse (points, scribbles): burn vector features with pixel
            buffers and leave every other pixel ignore (:mod:`geoseg_cli.sparse`); skip
            chips without a labelled pixel; record ``sparse`` and ``coverage``.
        buffer: Buffer of sparse points and lines in pixels (default 2 for points, 1 for
            lines).
        overwrite: Replace an existing output folder.

    Raises:
        UsageError: Inconsistent options.
        InputError: Unreadable or inconsistent inputs (grid mismatch, unknown labels ...).
        OutputError: The output exists (without ``overwrite``) or cannot be written.
    """
    images, labels = [str(p) for p in images], [str(p) for p in labels]
    stride = size if stride is None else stride
    _check_options(images, labels, size, stride, count, max_nodata, val_fraction, split, block_size)
    check_output(outdir, overwrite)
    infos = inspect_images(images, bidx, size)
    sources = open_tile_labels(labels, class_field, class_value, sparse, buffer)
    pairs = [(info, sources[i if len(sources) > 1 else 0]) for i, info in enumerate(infos)]
    for info, source in pairs:
        if source.kind != "vector":
            source.check_grid(info.path)
    images_of = [(i.path, list(i.bands)) for i in infos] if len(sources) == len(infos) else None
    table = resolve_classes(sources, classes, ignore_index, images_of)
    bands = list(infos[0].bands)
    opts = _Options(bands, size, max_nodata, scale or default_scale(infos[0].dtype), table, sparse)
    mode = split or ("source" if len(images) > 1 else "blocks")
    block = block_size or default_block_size([(i.width, i.height) for i in infos], size)

    rng = np.random.default_rng([seed, 0])
    if count is None:
        grids = [grid_windows(i.width, i.height, size, stride) for i in infos]
        plans = [(iter(grid), None) for grid in grids]
        total = sum(len(grid) for grid in grids)
    else:
        positions = np.array([(i.width - size + 1) * (i.height - size + 1) for i in infos])
        quotas = rng.multinomial(count, positions / positions.sum())
        # Rejected (nodata) draws are replaced, up to RANDOM_ATTEMPTS draws per chip.
        plans = [
            (islice(random_windows(rng, i.width, i.height, size), RANDOM_ATTEMPTS * q), int(q))
            for i, q in zip(infos, quotas, strict=True)
        ]
        total = count

    chips: list[_Chip] = []
    skipped = unlabelled = 0
    with atomic_output(outdir, overwrite) as out:
        (out / IMAGES).mkdir(parents=True)
        (out / LABELS).mkdir()
        with progress(total=total, desc="tile", unit="chip") as bar:
            for index, ((info, source), (windows, quota)) in enumerate(
                zip(pairs, plans, strict=True)
            ):
                if quota == 0:
                    continue
                new, n_skipped, n_unlabelled = _cut_source(
                    index, info, source, windows, quota, out, opts, bar
                )
                chips += new
                skipped += n_skipped
                unlabelled += n_unlabelled
        if not chips:
            raise InputError(
                f"no chip holds a labelled pixel ({unlabelled} windows without one): do the "
                "sparse labels overlap the images (check their CRS)?"
                if unlabelled
                else f"no chip has at most {max_nodata:.0%} nodata; raise --max-nodata or "
                "check the images' nodata"
            )
        sources = [c.source for c in chips]
        assign_splits([c.record for c in chips], sources, images, mode, val_fraction, seed, block)
        left_out = [c.record for c in chips if c.record.split == BUFFER]
        for record in left_out:
            record.image(out).unlink()
            record.label(out).unlink()
        chips = [c for c in chips if c.record.split != BUFFER]
        stats = _write_index(out, chips, infos, opts, None if count else stride)
    overlap = "random chips overlap" if count else f"--stride {stride} < --size {size}"
    overlap = overlap if count or stride < size else None
    report_split(mode, [c.record for c in chips], len(left_out), block, val_fraction, overlap)
    empty = [name for name, n in zip(table.names, stats.class_counts, strict=True) if n == 0]
    if empty:
        log.warning(
            "class(es) %s have no pixel in the chips (a stray label value, polygons outside "
            "the images, or a class only in skipped chips?); training cannot learn them and "
            "their 0 scores lower the mean: check the labels or give a classes file",
            ", ".join(empty),
        )
    n_val = stats.num_chips["val"]
    summary = TileSummary(
        output=str(outdir),
        num_chips=stats.num_chips,
        skipped=skipped,
        sampling="grid" if count is None else "random",
        split=mode,
        classes=table.names,
        class_counts=stats.class_counts,
        left_out=len(left_out),
        sparse=sparse,
        unlabelled=unlabelled,
        coverage=stats.coverage,
    )
    log.info(
        "wrote %d chips (%d train, %d val) to %s; skipped %d with too much nodata%s",
        len(chips),
        len(chips) - n_val,
        n_val,
        outdir,
        skipped,
        f" and {unlabelled} without a labelled pixel; {100 * stats.coverage:.2f}% of the "
        "train chips' pixels are labelled (sparse)"
        if sparse
        else "",
    )
    return summary
