"""Keep freed memory for reuse: a process-wide glibc malloc setting for faster CPU inference."""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory at the top of the heap kept rather than given back (the largest C int).
_TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep freed ones for reuse.

    PyTorch on CPU allocates every large activation anew; glibc serves blocks above its
    mmap threshold with ``mmap`` and unmaps them when freed, so every forward pass would
    page-fault its large activations in again. PyTorch's CPU tuning advice is to preload
    jemalloc or tcmalloc; this gets the same effect from glibc itself. The cost: memory the
    process frees stays mapped (its peak resident size is unchanged). The ``geoseg`` command
    calls it at start; library users may call it themselves.

    Returns:
        Whether the setting took effect (False on anything but Linux with glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 — glibc only (not musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    log.debug("glibc malloc keeps freed memory for reuse: %s", done)
    return done
