"""Turning read and write faults (full disk, damaged files, stale temporary folders) into errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import rasterio
from rasterio._err import CPLE_BaseError  # GDAL's errors: no public base class
from rasterio.errors import RasterioIOError

from geoseg_cli.errors import InputError, OutputError, first_line

log = logging.getLogger(__name__)

#: Free space (bytes) under which a failed write is reported as a full disk: GDAL reports
#: a failed block write without the operating system's reason.
DISK_FULL_BYTES = 64 * 2**20


def gdal_reason(exc: BaseException) -> str:
    """GDAL's own reason for a rasterio error (rasterio's message says "see previous")."""
    cause = exc.__cause__ or exc.__context__
    return first_line(cause if isinstance(cause, Exception) and str(cause) else exc)


@contextlib.contextmanager
def read_errors(src: rasterio.DatasetReader) -> Iterator[None]:
    """Turn a failed read of ``src`` (a truncated or damaged file) into an InputError.

    Raises:
        InputError: Names the raster, GDAL's reason and the fix.
    """
    try:
        yield
    except RasterioIOError as exc:
        raise InputError(
            f"{src.name}: reading failed ({gdal_reason(exc)}); the file is damaged or "
            "truncated: check it with gdalinfo -checksum and copy or write it again"
        ) from exc


@contextlib.contextmanager
def gdal_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Raise an OSError naming ``path`` when GDAL fails writing to it.

    Wrap the writes and the close: GDAL writes the blocks it caches when the dataset
    closes, and a failure there raises nothing (libtiff prints "No space left on device"
    and leaves the file truncated). So a file written on a nearly full disk is read back.

    Raises:
        OSError: ``path`` as its filename, GDAL's reason as its message.
    """
    try:
        yield
    except (RasterioIOError, CPLE_BaseError) as exc:
        raise OSError(errno.EIO, gdal_reason(exc), str(path)) from exc
    if Path(path).is_file() and _little_space(Path(path).parent):
        _read_back(Path(path))


def _read_back(path: Path) -> None:
    """Read every block of a GDAL file; a failure means the disk filled while writing it.

    Raises:
        OSError: ENOSPC, naming ``path``.
    """
    try:
        with rasterio.open(path) as src:
            for _, window in src.block_windows(1):
                src.read(window=window)
    except RasterioIOError as exc:
        reason = f"the file is incomplete: {gdal_reason(exc)}"
        raise OSError(errno.ENOSPC, reason, str(path)) from exc


@contextlib.contextmanager
def write_errors(final: Path, folder: Path) -> Iterator[None]:
    """Turn a failure while writing ``final`` in ``folder`` into an OutputError naming it.

    A full disk (by the error, or, for an error about a file in ``folder``, by the free
    space left), or any other OSError about a file in ``folder``; other errors pass.

    Raises:
        OutputError: Names ``final``, the reason and the fix.
    """
    try:
        yield
    except OSError as exc:
        names = [str(n) for n in (exc.filename, exc.filename2) if n]
        written = any(n.startswith(str(folder)) for n in names)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or (written and _little_space(folder))
        if full:
            raise OutputError(f"{final}: disk full; free space or write elsewhere") from exc
        if not written:
            raise
        reason = (exc.strerror or first_line(exc)).replace(str(folder), str(final.parent))
        raise OutputError(
            f"{final}: writing failed ({reason}); check the folder {final.parent} (free "
            "space, permissions, network)"
        ) from exc


def _little_space(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def temp_prefix(final: Path) -> str:
    """Name prefix of the temporary folders of ``final``: its name, this host and PID."""
    return f".{final.name}.{_host()}.{os.getpid()}."


def sweep_stale(final: Path) -> None:
    """Remove temporary folders of ``final`` left by killed processes of this host.

    Folders of processes still running (another run writing the same output) are kept.
    """
    pattern = re.compile(rf"\.{re.escape(final.name)}\.{re.escape(_host())}\.(\d+)\.\w+\.tmp")
    with contextlib.suppress(OSError):  # an unreadable folder: nothing to sweep
        for entry in os.scandir(final.parent):
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False) and not _alive(int(match[1])):
                shutil.rmtree(entry.path, ignore_errors=True)
                log.info("removed %s, left by process %s that was killed", entry.path, match[1])


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # signal 0 is CTRL_C_EVENT there: never probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
