"""Opening rasters, output safety (atomic writes), and small raster helpers.

Every reader in geoseg opens rasters through :func:`open_raster` so that a missing or
unreadable file becomes a one-line :class:`~geoseg_cli.errors.InputError`, and every writer
goes through :func:`atomic_output` so that an interrupted run never leaves a half-written
file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import rasterio
from rasterio.errors import RasterioIOError

from geoseg_cli.errors import InputError, OutputError

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
    """Refuse an output that exists (without ``overwrite``) or whose folder is missing.

    Returns:
        The output as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist; create it first")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    Works for files and folders: whatever the body creates at the temporary path is moved
    into place when the body returns, and removed if it raises (including Ctrl-C).

    Args:
        path: Final output path.
        overwrite: Replace an existing output instead of refusing.

    Raises:
        OutputError: The output exists, its folder is missing, or the disk is full.
    """
    final = check_output(path, overwrite)
    tmp_dir = tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp = Path(tmp_dir) / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"{final}: disk full; free space or write elsewhere") from exc
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
