"""Progress bars on stderr that follow the logging level, and a log handler writing above them."""

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
    """A stream handler whose lines go above any progress bar on the same stream.

    ``tqdm.write`` clears the bars and draws them again, so a line is not glued to a bar.
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record above the progress bars."""
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler.emit does
            self.handleError(record)
