"""Reading and writing the TOML files of geoseg (classes files, training configurations)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from geoseg_cli.errors import GeosegError


def read_toml(path: str | os.PathLike, error: type[GeosegError]) -> dict[str, Any]:
    """Parse a TOML file.

    Args:
        path: The file.
        error: The error raised for a missing tomllib or invalid TOML.

    Raises:
        GeosegError: ``error`` with a one-line reason.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise error(f"{path}: reading TOML needs Python 3.11+ or `pip install tomli`") from exc
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid TOML ({exc})") from exc


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, number, string or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
