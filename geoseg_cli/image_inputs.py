"""Input images of tiling and pre-training (checked alike), and label pixels left unscored."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.raster import data_bands, iter_row_windows, open_raster, read_masked

log = logging.getLogger(__name__)

#: An image path and its 1-based data bands.
ImageBands = tuple[str, list[int]]


@dataclass
class ImageInfo:
    """An input image: path, chip-name prefix, size, data bands (1-based) and dtype."""

    path: str
    prefix: str
    width: int
    height: int
    bands: tuple[int, ...]
    dtype: str


def inspect_images(images: list[str], bidx: list[int] | None, size: int) -> list[ImageInfo]:
    """Check that the images open, are at least ``size`` px and have the same bands and dtype.

    Raises:
        UsageError: A band in ``bidx`` does not exist.
        InputError: An image is too small, or its bands differ from the first image's.
    """
    infos = []
    stems = [Path(p).stem for p in images]
    for i, path in enumerate(images):
        with open_raster(path) as src:
            bad = [b for b in bidx or [] if b > src.count]
            if bad:
                raise UsageError(f"{path} has {src.count} band(s); band {bad[0]} does not exist")
            if size > min(src.width, src.height):
                raise InputError(
                    f"chip size {size} is larger than {path} ({src.width}x{src.height} px); "
                    f"use --size {min(src.width, src.height)} or less"
                )
            bands = tuple(bidx or data_bands(src))
            dtypes = {src.dtypes[b - 1] for b in bands}
            if len(dtypes) > 1:
                raise InputError(f"{path}: bands of mixed types {sorted(dtypes)}; select bands")
            prefix = stems[i] if stems.count(stems[i]) == 1 else f"{stems[i]}-{i}"
            infos.append(ImageInfo(path, prefix, src.width, src.height, bands, dtypes.pop()))
    first = infos[0]
    for info in infos[1:]:
        if (info.bands, info.dtype) != (first.bands, first.dtype):
            raise InputError(
                f"{info.path} has {info.dtype} data band(s) {list(info.bands)} but "
                f"{first.path} has {first.dtype} band(s) {list(first.bands)}; tile images of "
                "one kind together (or use -b)"
            )
    return infos


def unscored_under_data(
    label_path: str, image: ImageBands, ignore: int | None
) -> tuple[int, int, int]:
    """Pixels where the image has data, and among them the unscored label pixels.

    Args:
        label_path: A label raster on the image's grid.
        image: The image path and its data bands.
        ignore: The ignore index, or None not to count it.

    Returns:
        The image pixels with data, the label pixels masked there and those equal to
        ``ignore`` there (label pixels under image nodata are expected to be unlabelled).
    """
    pixels = masked = ignored = 0
    path, bands = image
    with open_raster(label_path) as labels, open_raster(path) as src:
        for window in iter_row_windows(src.width, src.height):
            _, has_data = read_masked(src, window, bands)
            values, labelled = read_masked(labels, window, [1])
            pixels += int(np.count_nonzero(has_data))
            masked += int(np.count_nonzero(has_data & ~labelled))
            if ignore is not None:
                ignored += int(np.count_nonzero(has_data & labelled & (values[0] == ignore)))
    return pixels, masked, ignored


def warn_unscored_labels(
    path: str, pixels: int, nodata_pixels: int, nodata: float | None, ignored: int, ignore: int
) -> None:
    """Warn about labelled pixels that are dropped without being a class.

    Those equal to the label raster's nodata value (when it is not the ignore index) and those
    equal to the ignore index. Either may be a class by mistake: the background of a 0/1 mask
    whose nodata is 0, the objects of a 0/255 mask.
    """
    if nodata_pixels and nodata is not None and nodata != ignore:
        log.warning(
            "%s: %d px (%.1f%%) have the raster's nodata value %g and are ignored; if %g is "
            "a class (e.g. the background of a 0/1 mask), unset it: gdal_edit.py "
            "-unsetnodata %s",
            path, nodata_pixels, 100 * nodata_pixels / pixels, nodata, nodata, path,
        )  # fmt: skip
    if ignored:
        log.warning(
            "%s: %d px (%.1f%%) have value %d, the ignore index, and are ignored; if that "
            "value is a class (e.g. a 0/255 mask), map it with 'value' in a classes file or "
            "pass another --ignore-index",
            path, ignored, 100 * ignored / pixels, ignore,
        )  # fmt: skip
