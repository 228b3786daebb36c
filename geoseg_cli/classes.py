"""Classes: names, display colours, label values, presets and classes files (TOML or JSON)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoseg_cli.errors import InputError
from geoseg_cli.raster import atomic_output
from geoseg_cli.tomlfile import read_toml, toml_value

RGB = tuple[int, int, int]

#: Built-in classes presets, in the classes-file layout.
PRESETS: dict[str, dict[str, Any]] = {
    "isprs": {
        "classes": [
            {"name": "impervious", "color": [255, 255, 255]},
            {"name": "building", "color": [0, 0, 255]},
            {"name": "low_vegetation", "color": [0, 255, 255]},
            {"name": "tree", "color": [0, 255, 0]},
            {"name": "car", "color": [255, 255, 0]},
            {"name": "clutter", "color": [255, 0, 0]},
        ],
        # Black marks the eroded class boundaries of the ISPRS "_noBoundary" ground truth.
        "ignore_colors": [[0, 0, 0]],
    }
}

#: Display colours of inferred classes (class 0 first).
_PALETTE: list[RGB] = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
]
_CLASS_KEYS = {"name", "color", "value"}
_TABLE_KEYS = {"classes", "ignore_index", "ignore_colors"}


@dataclass(frozen=True)
class ClassInfo:
    """One class: its name, RGB display colour and the raw label value that means it.

    Attributes:
        name: Class name.
        color: RGB display colour.
        value: Raw label value of the class, or None for its position in the class list.
    """

    name: str
    color: RGB
    value: int | None = None

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., "color": [r, g, b]}``, as checkpoints and stats.json hold it."""
        return {"name": self.name, "color": list(self.color)}


def default_color(index: int) -> RGB:
    """A fixed display colour for class ``index`` (distinct for the first 20)."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    return ((index * 67) % 256, (index * 137) % 256, (index * 199) % 256)


def rgb_code(rgb: np.ndarray) -> np.ndarray:
    """Pack uint8 R, G, B planes (3×…) into one integer per pixel."""
    rgb = rgb.astype(np.int64)
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


@dataclass
class ClassTable:
    """The classes of a label set and how raw labels map to class ids.

    Attributes:
        classes: Classes in class-id order.
        ignore_index: Label id for "not labelled" (nodata, unknown, out of image).
        ignore_colors: Palette colours that map to the ignore index.
        source: Where the table came from (file path, preset name or ``"inferred"``).
    """

    classes: list[ClassInfo]
    ignore_index: int = 255
    ignore_colors: tuple[RGB, ...] = ()
    source: str = "inferred"
    _values: np.ndarray = field(init=False, repr=False)
    _colors: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.classes)
        if n == 0:
            raise InputError(f"{self.source}: no classes defined; add [[classes]] entries")
        if not 0 <= self.ignore_index <= 65535 or self.ignore_index < n:
            raise InputError(
                f"{self.source}: ignore index {self.ignore_index} must be in {n}..65535 "
                f"(not a class id of the {n} classes); set another ignore index"
            )
        values = [i if c.value is None else c.value for i, c in enumerate(self.classes)]
        for what, keys in (("names", [c.name for c in self.classes]), ("values", values)):
            dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
            if dupes:
                raise InputError(f"{self.source}: duplicate class {what} {', '.join(dupes)}")
        self._values = np.array(values, dtype=np.int64)
        self._colors = rgb_code(np.array([c.color for c in self.classes], dtype=np.int64).T)

    @property
    def names(self) -> list[str]:
        """Class names in id order."""
        return [c.name for c in self.classes]

    @property
    def dtype(self) -> str:
        """Label chip data type: uint8 unless class ids or the ignore index need uint16."""
        return "uint8" if max(len(self.classes) - 1, self.ignore_index) <= 255 else "uint16"

    @property
    def background(self) -> int:
        """Id for pixels no polygon covers: the class named "background", else ignore."""
        lowered = [name.lower() for name in self.names]
        return lowered.index("background") if "background" in lowered else self.ignore_index

    def map_values(self, raw: np.ndarray) -> np.ndarray:
        """Map raw label values to class ids.

        Other values (the ignore index, unless a class claims it as its ``value``, and NaN or
        infinite floats) → ignore.
        """
        if raw.dtype.kind != "f":
            return self._lookup(raw.astype(np.int64, copy=False), self._values, ())
        finite = np.isfinite(raw)
        ids = self._lookup(np.where(finite, raw, -1).astype(np.int64), self._values, ())
        ids[~finite] = self.ignore_index
        return ids

    def map_colors(self, rgb: np.ndarray) -> np.ndarray:
        """Map a 3×rows×cols uint8 RGB label array to class ids; unknown colours → ignore."""
        ignore = tuple(rgb_code(np.array(c).reshape(3, 1))[0] for c in self.ignore_colors)
        return self._lookup(rgb_code(rgb), self._colors, ignore)

    def _lookup(self, keys: np.ndarray, table: np.ndarray, ignore: Iterable[int]) -> np.ndarray:
        order = np.argsort(table)
        sorted_keys = table[order]
        pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(table) - 1)
        found = sorted_keys[pos] == keys
        out = np.full(keys.shape, self.ignore_index, dtype=self.dtype)
        out[found] = order[pos[found]]
        for code in ignore:
            out[keys == code] = self.ignore_index
        return out

    def unknown_values(self, counts: dict[int, int]) -> dict[int, int]:
        """Raw values (with counts) that are neither a class value nor the ignore index."""
        known = set(self._values.tolist()) | {self.ignore_index}
        return {v: n for v, n in counts.items() if v not in known}

    def unknown_colors(self, counts: dict[RGB, int]) -> dict[RGB, int]:
        """Palette colours (with counts) that are neither a class colour nor ignored."""
        known = {c.color for c in self.classes} | set(self.ignore_colors)
        return {c: n for c, n in counts.items() if c not in known}


def _parse_color(value: Any, where: str) -> RGB:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        raise InputError(f"{where}: color must be [r, g, b] with integers 0-255, not {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def parse_classes(
    data: Any, source: str, ignore_index: int | None = None, require_colors: bool = False
) -> ClassTable:
    """Build a :class:`ClassTable` from a classes-file document.

    A classes file (TOML; JSON with the same keys works too)::

        ignore_index = 255            # optional (default 255)
        ignore_colors = [[0, 0, 0]]   # optional: palette colours that mean "not labelled"

        [[classes]]
        name = "background"
        color = [0, 0, 0]             # optional for class-index labels
        [[classes]]
        name = "road"
        color = [255, 0, 0]
        value = 255                   # optional: raw label value (default: the class position)

    Class ids are positions in the list; the ignore index is never a class id.

    Args:
        data: The parsed TOML/JSON document (keys above).
        source: File name or preset name, for messages.
        ignore_index: Overrides the document's ``ignore_index`` when given.
        require_colors: Every class needs a colour (palette label rasters).

    Raises:
        InputError: The document is malformed.
    """
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise InputError(f"{source}: expected a 'classes' list of {{name, color}} entries")
    extra = set(data) - _TABLE_KEYS
    if extra:
        raise InputError(
            f"{source}: unknown key(s) {', '.join(sorted(extra))}; allowed: "
            f"{', '.join(sorted(_TABLE_KEYS))}"
        )
    classes = []
    for i, entry in enumerate(data["classes"]):
        where = f"{source}: class {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(f"{where}: each class needs a string 'name'")
        if set(entry) - _CLASS_KEYS:
            raise InputError(
                f"{where}: unknown key(s) {', '.join(sorted(set(entry) - _CLASS_KEYS))}; "
                f"allowed: {', '.join(sorted(_CLASS_KEYS))}"
            )
        if "color" not in entry and require_colors:
            raise InputError(f"{where}: RGB label rasters need a 'color' for every class")
        color = _parse_color(entry["color"], where) if "color" in entry else default_color(i)
        value = entry.get("value", i)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{where}: 'value' must be an integer ≥ 0, not {value!r}")
        classes.append(ClassInfo(entry["name"], color, value))
    ignore = data.get("ignore_index", 255) if ignore_index is None else ignore_index
    if not isinstance(ignore, int) or isinstance(ignore, bool):
        raise InputError(f"{source}: ignore_index must be an integer, not {ignore!r}")
    colors = [c.color for c in classes]
    dupes = sorted({str(c) for c in colors if colors.count(c) > 1})
    if dupes and require_colors:
        raise InputError(f"{source}: several classes share colour(s) {', '.join(dupes)}")
    ignore_colors = data.get("ignore_colors", [])
    if not isinstance(ignore_colors, list):
        raise InputError(f"{source}: ignore_colors must be a list of [r, g, b]")
    ignored = tuple(_parse_color(c, f"{source}: ignore_colors") for c in ignore_colors)
    explicit = {tuple(e["color"]) for e in data["classes"] if "color" in e}
    clash = sorted(str(c) for c in set(ignored) & explicit)
    if clash:
        raise InputError(f"{source}: colour(s) {', '.join(clash)} are both a class and ignored")
    return ClassTable(classes, ignore_index=ignore, ignore_colors=ignored, source=source)


def read_classes_document(spec: str | os.PathLike) -> tuple[Any, str]:
    """Read a classes file (TOML or JSON) or a preset name.

    Returns:
        (parsed document, source name for messages).
    """
    name = str(spec)
    if name in PRESETS and not Path(name).exists():
        return PRESETS[name], name
    path = Path(spec)
    if not path.is_file():
        raise InputError(
            f"{path}: no such classes file; give a TOML/JSON file or a preset "
            f"({', '.join(PRESETS)})"
        )
    if path.suffix.lower() == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8")), name
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
    return read_toml(path, InputError), name


def load_classes(
    spec: str | os.PathLike, ignore_index: int | None = None, require_colors: bool = False
) -> ClassTable:
    """Load a classes file or preset (``isprs``) as a :class:`ClassTable`."""
    data, source = read_classes_document(spec)
    return parse_classes(data, source, ignore_index, require_colors)


def write_classes_file(
    path: str | os.PathLike,
    table: ClassTable,
    comment: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``table`` as a classes file that :func:`load_classes` reads back.

    TOML for ``.toml`` (``comment`` lines first, as ``#`` comments), JSON for ``.json``;
    class values are written only where a class has one.

    Returns:
        The file written.
    """
    path = Path(path)
    entries = [
        {**c.describe(), **({} if c.value is None else {"value": c.value})} for c in table.classes
    ]
    if path.suffix.lower() == ".json":
        text = json.dumps({"ignore_index": table.ignore_index, "classes": entries}, indent=2)
    else:
        lines = [*(f"# {line}" for line in comment), f"ignore_index = {table.ignore_index}"]
        for entry in entries:
            lines += ["", "[[classes]]", *(f"{k} = {toml_value(v)}" for k, v in entry.items())]
        text = "\n".join(lines)
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path
