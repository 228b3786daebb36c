"""Silencing the ONNX exporter and quantizer stack's prints, warnings and log chatter."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: Loggers of the exporter stack whose progress chatter is hidden unless geoseg runs with -v.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Hide the exporter's progress prints, warnings and log chatter (shown with -v).

    Also keeps libraries that log through the root logger (onnxruntime.quantization) from
    installing a root handler of their own.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    root = logging.getLogger()
    root_level, guard = root.level, logging.NullHandler()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    root.addHandler(guard)
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        root.removeHandler(guard)
        root.setLevel(root_level)
