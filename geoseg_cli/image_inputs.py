"""The input images of tiling and pre-training: size, data bands and dtype, checked alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.raster import data_bands, iter_row_windows, open_raster, read_masked

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
