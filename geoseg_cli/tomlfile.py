"""Reading and writing the TOML files of geoseg (classes files, training configurations)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from geoseg_cli.errors import GeosegError


def _tomllib(source: str | os.PathLike, error: type[GeosegError]) -> Any:
    """The TOML parser: tomllib, or tomli on Python 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise error(
                f"{source}: reading TOML needs Python 3.11+ or `pip install tomli`"
            ) from exc
    return tomllib


def read_toml(path: str | os.PathLike, error: type[GeosegError]) -> dict[str, Any]:
    """Parse a TOML file.

    Args:
        path: The file.
        error: The error raised for a missing tomllib or invalid TOML.

    Raises:
        GeosegError: ``error`` with a one-line reason.
    """
    tomllib = _tomllib(path, error)
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid TOML ({exc})") from exc


def parse_toml_value(text: str, source: str, error: type[GeosegError]) -> Any:
    """The value of a TOML literal (``0.3``, ``false``, ``[28, 28]``), else ``text`` itself.

    Args:
        text: The literal, e.g. the VALUE of a command-line ``KEY=VALUE``.
        source: What the text came from, for the message of a missing tomllib.
        error: The error raised for a missing tomllib.
    """
    tomllib = _tomllib(source, error)
    try:
        return tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return text


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
