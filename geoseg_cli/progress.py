"""Progress bars on stderr that follow the logging level (``-q`` silences them)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """Return a tqdm bar on stderr, disabled when geoseg logs below INFO.

    Args:
        iterable: What to iterate over (optional, as with tqdm).
        **kwargs: Passed to :class:`tqdm.tqdm` (``total``, ``desc``, ``unit`` ...).
    """
    enabled = logging.getLogger("geoseg_cli").isEnabledFor(logging.INFO)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not enabled, **kwargs)
