"""Progress bars on stderr that follow the logging level (``-q`` silences them), and a log
handler that writes above them.

tqdm is imported when first used, so that ``geoseg --help`` does not pay for it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """Return a tqdm bar on stderr, disabled when geoseg logs below INFO.

    Args:
        iterable: What to iterate over (optional, as with tqdm).
        **kwargs: Passed to :class:`tqdm.tqdm` (``total``, ``desc``, ``unit`` ...).
    """
    from tqdm.auto import tqdm

    enabled = logging.getLogger("geoseg_cli").isEnabledFor(logging.INFO)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not enabled, **kwargs)


class ProgressLogHandler(logging.StreamHandler):
    """A stream handler whose lines go above any progress bar on the same stream instead of
    being glued to the bar's line (``tqdm.write`` clears the bars and draws them again)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler.emit does
            self.handleError(record)
