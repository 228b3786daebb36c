"""Opening rasters, output safety (atomic writes), and small raster helpers."""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import RasterioIOError, WindowError
from rasterio.io import MemoryFile
from rasterio.transform import from_origin
from rasterio.windows import Window, from_bounds

from geoseg_cli.errors import InputError, OutputError, UsageError
from geoseg_cli.faults import read_errors, sweep_stale, temp_prefix, write_errors

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_raster(path: str | os.PathLike) -> Iterator[rasterio.DatasetReader]:
    """Open a raster for reading, turning GDAL failures into a clear :class:`InputError`.

    Args:
        path: Anything ``rasterio.open`` accepts (local path, ``s3://``, ``/vsicurl/`` ...).

    Yields:
        The open dataset. A raster without CRS is allowed with a warning.
    """
    try:
        src = rasterio.open(path)
    except RasterioIOError as exc:
        if "://" not in str(path) and not str(path).startswith("/vsi") and not Path(path).exists():
            raise InputError(f"{path}: no such file; check the path") from exc
        raise InputError(
            f"{path}: not a readable raster ({str(exc).splitlines()[0]}); "
            "give a GeoTIFF or another GDAL-readable raster"
        ) from exc
    with src:
        if src.crs is None:
            log.warning("%s has no CRS: outputs will be in pixel coordinates", path)
        yield src


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that exists (without ``overwrite``) or whose folder is missing or locked.

    Returns:
        The output as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{path}: folder {path.parent} is not writable; write elsewhere or fix its permissions"
        )
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    Works for files and folders: whatever the body creates at the temporary path is moved
    into place when the body returns, and removed if it raises (including Ctrl-C). Files
    the body writes beside it under the same stem (a Shapefile's ``.shx``, ``.dbf``,
    ``.prj``) are moved along.

    Args:
        path: Final output path.
        overwrite: Replace an existing output instead of refusing.

    Temporary folders of the same output left by killed processes are removed first.

    Raises:
        OutputError: The output exists, its folder is missing or read-only, the disk is
            full, or writing a file at the temporary path failed (named after ``path``).
    """
    final = check_output(path, overwrite)
    sweep_stale(final)
    with write_errors(final, final.parent):
        tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    tmp = tmp_dir / final.name
    try:
        with write_errors(final, tmp_dir):
            yield tmp
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            for sidecar in tmp_dir.glob(f"{glob.escape(final.stem)}.*"):
                if sidecar != tmp:
                    os.replace(sidecar, final.with_name(sidecar.name))
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def read_masked(
    src: rasterio.DatasetReader, window: Window | None = None, indexes: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read bands and their valid-data mask over a window.

    A pixel is valid when GDAL's mask (nodata value, alpha band or internal mask) marks at
    least one of the bands valid, as :meth:`rasterio.DatasetReader.dataset_mask` does, and,
    for floating-point rasters, when every band is finite.

    Args:
        src: Open dataset.
        window: Window to read (default: the whole raster).
        indexes: 1-based band indexes (default: all bands).

    Returns:
        (data bands×rows×cols in the source dtype, valid rows×cols bool).
    """
    indexes = list(indexes or src.indexes)
    with read_errors(src):
        data = src.read(indexes, window=window)
        valid = src.read_masks(indexes, window=window).any(axis=0)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
    return data, valid


def iter_row_windows(width: int, height: int, max_pixels: int = 1 << 24) -> Iterator[Window]:
    """Full-width windows of whole rows, each holding at most ``max_pixels`` (≥ 1 row)."""
    rows = max(1, max_pixels // max(width, 1))
    for row in range(0, height, rows):
        yield Window(0, row, width, min(rows, height - row))


def crs_name(crs: rasterio.crs.CRS | None) -> str:
    """Short CRS label for messages: ``EPSG:32618``, or the WKT's name for custom CRSs."""
    if crs is None:
        return "no CRS"
    epsg = crs.to_epsg()
    if epsg is not None:
        return f"EPSG:{epsg}"
    match = re.match(r'\s*\w+\[\s*"([^"]*)"', crs.to_wkt())
    return f'custom CRS "{match.group(1)}"' if match else "custom CRS"


def describe_grid(src: rasterio.DatasetReader) -> str:
    """One-line description of a raster's grid: CRS, size, pixel size and origin."""
    crs = crs_name(src.crs)
    t = src.transform
    origin = f"({t.c:.10g}, {t.f:.10g})"
    return f"{crs}, {src.width}x{src.height} px, pixel {t.a:g}x{t.e:g}, origin {origin}"


def same_grid(a: rasterio.DatasetReader, b: rasterio.DatasetReader, tol: float = 1e-6) -> bool:
    """True when two rasters share CRS, size and transform (to ``tol`` pixels)."""
    if (a.width, a.height) != (b.width, b.height) or a.crs != b.crs:
        return False
    ta, tb = a.transform, b.transform
    pixel = max(abs(ta.a), abs(ta.e), abs(ta.b), abs(ta.d))
    return all(abs(x - y) <= tol * pixel for x, y in zip(ta[:6], tb[:6], strict=True))


def ground_resolution(src: rasterio.DatasetReader) -> tuple[float | None, bool]:
    """Pixel size in metres (mean of x and y) and whether it is an approximation.

    Geographic CRSs are converted at the raster's centre latitude (approximate); a raster
    without CRS has no known resolution.

    Returns:
        (metres or None, approximate).
    """
    t = src.transform
    size_x, size_y = float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e))
    if src.crs is None:
        return None, False
    if src.crs.is_geographic:
        lat = np.radians((src.bounds.top + src.bounds.bottom) / 2)
        metres = (size_x * 111_320.0 * float(np.cos(lat)) + size_y * 110_574.0) / 2
        return metres, True
    factor = src.crs.linear_units_factor[1]
    return (size_x + size_y) / 2 * factor, False


def output_profile(
    src: rasterio.DatasetReader,
    *,
    count: int,
    dtype: str,
    nodata: float | None,
    window: Window | None = None,
    creation_options: dict[str, str] | None = None,
) -> dict:
    """A GeoTIFF profile on the grid of ``src`` (or of a window of it).

    Defaults: tiled (512 px blocks, smaller for small rasters), DEFLATE, BIGTIFF=IF_SAFER;
    ``creation_options`` (``--co NAME=VALUE``) override them.

    Args:
        src: Dataset whose CRS and transform the output keeps.
        count: Number of bands.
        dtype: Band data type.
        nodata: Output nodata value (None for none).
        window: Part of ``src`` the output covers (default: all of it).
        creation_options: GDAL creation options, upper- or lower-case keys.
    """
    window = window or Window(0, 0, src.width, src.height)
    width, height = int(window.width), int(window.height)
    block = min(512, 16 * -(-max(width, height) // 16))
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "crs": src.crs,
        "transform": src.window_transform(window),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "bigtiff": "IF_SAFER",
    }
    profile.update({key.lower(): value for key, value in (creation_options or {}).items()})
    return profile


class _Collect(logging.Handler):
    """Keeps the messages of the log records it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_creation_options(creation_options: dict[str, str], driver: str = "GTiff") -> None:
    """Refuse GDAL creation options the driver would ignore or fail on, before any work.

    GDAL only warns about an unknown option or a value it does not recognise and writes with
    its defaults, so a typo (``--co COMPRES=LZW``) would go unnoticed. The options are tried
    on a 16 × 16 in-memory copy; GDAL's other warnings about them (a value outside the
    advised range, which GDAL still uses) are logged.

    Args:
        creation_options: ``--co`` options, upper- or lower-case keys.
        driver: ``"GTiff"`` or ``"COG"``.

    Raises:
        UsageError: An option GDAL ignores or fails on, with GDAL's reason.
    """
    if not creation_options:
        return
    options = {key.upper(): value for key, value in creation_options.items()}
    gdal_log, collect = logging.getLogger("rasterio._env"), _Collect()
    level = gdal_log.level
    gdal_log.addHandler(collect)
    gdal_log.setLevel(logging.WARNING)
    target = f"/vsimem/geoseg-co-{uuid.uuid4().hex}.tif"
    profile = {"driver": "GTiff", "width": 16, "height": 16, "count": 1, "dtype": "uint8"}
    refused = []
    try:
        with (
            MemoryFile() as memory,
            memory.open(**profile, transform=from_origin(0, 16, 1, 1)) as probe,
        ):
            probe.write(np.zeros((1, 16, 16), np.uint8))
            rasterio.shutil.copy(probe, target, driver=driver, **options)
    except Exception as exc:  # GDAL errors (rasterio._err) have no public base class
        refused.append(str(exc))
    finally:
        gdal_log.removeHandler(collect)
        gdal_log.setLevel(level)
        with contextlib.suppress(Exception):  # nothing written, or a broken file
            rasterio.shutil.delete(target)
    given = " ".join(f"--co {key}={value}" for key, value in options.items())
    for message in collect.messages:
        if message.startswith("CPLE_IllegalArg") or "does not support creation" in message:
            refused.append(message)
    if not refused:
        for message in collect.messages:
            log.warning("%s: GDAL: %s", given, re.sub(r"^CPLE_\w+ in ", "", message))
        return
    reason = (
        re.sub(r"^CPLE_\w+ in ", "", refused[-1]).strip().rstrip(".").removesuffix(", ignoring")
    )
    reason = reason.replace(f"{target}: ", "").replace(target, "the output")
    raise UsageError(
        f"{given}: {reason}; see the {driver} driver's creation options at "
        f"https://gdal.org/en/stable/drivers/raster/{driver.lower()}.html"
    )


def bounds_window(src: rasterio.DatasetReader, bounds: tuple[float, float, float, float]) -> Window:
    """Whole-pixel window of ``src`` covering ``(left, bottom, right, top)`` in its CRS.

    Partial pixels are included; the window is clipped to the raster.

    Raises:
        UsageError: ``left >= right`` or ``bottom >= top``.
        InputError: The bounds do not overlap the raster.
    """
    left, bottom, right, top = bounds
    if left >= right or bottom >= top:
        raise UsageError(
            f"--bounds {' '.join(f'{v:g}' for v in bounds)}: give LEFT BOTTOM RIGHT TOP with "
            "left < right and bottom < top"
        )
    # rounded to a millionth of a pixel so that float noise does not add a row or column
    window = from_bounds(left, bottom, right, top, transform=src.transform).round(6)
    (row0, row1), (col0, col1) = window.toranges()
    col, row = math.floor(col0), math.floor(row0)
    whole = Window(col, row, math.ceil(col1) - col, math.ceil(row1) - row)
    try:
        return whole.intersection(Window(0, 0, src.width, src.height))
    except WindowError:
        raise InputError(
            f"{src.name}: bounds {bounds} do not overlap the raster {tuple(src.bounds)}; "
            "give --bounds in the raster's CRS"
        ) from None


def nodata_valid(data: np.ndarray, nodata: float) -> np.ndarray:
    """Valid-pixel mask (rows×cols) of ``data`` (bands×rows×cols) for a nodata value.

    A pixel is nodata when every band equals ``nodata`` (or, for floats, is not finite).
    """
    if np.isnan(nodata):
        return np.isfinite(data).any(axis=0)
    valid = (data != nodata).any(axis=0)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
    return valid


def nodata_value(src: rasterio.DatasetReader) -> float | None:
    """The nodata value pixels can equal: None when it is unset or NaN."""
    nodata = src.nodata
    return None if nodata is None or np.isnan(nodata) else nodata


def data_bands(src: rasterio.DatasetReader) -> list[int]:
    """The 1-based bands that hold data.

    All but alpha bands, which GDAL reads as the other bands' mask (as QGIS and rio-tiler do);
    every band when all are alpha.
    """
    bands = [i for i in src.indexes if src.colorinterp[i - 1] != ColorInterp.alpha]
    return bands or list(src.indexes)


def has_mask(src: rasterio.DatasetReader, indexes: list[int]) -> bool:
    """True when GDAL knows invalid pixels (nodata value, alpha or mask band) in ``indexes``."""
    return any(src.mask_flag_enums[i - 1] != [MaskFlags.all_valid] for i in indexes)
