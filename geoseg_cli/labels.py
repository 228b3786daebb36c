"""Label sources: class-index rasters, RGB-palette rasters, vector polygons (tile, evaluate).

A :class:`ClassTable` says which classes exist (names, display colours), which raw label
values or palette colours map to them, and which index means "ignore". It comes from a
classes file (TOML or JSON), a built-in preset (``isprs``) or is inferred from the labels.

Classes file (TOML; JSON with the same keys works too)::

    ignore_index = 255            # optional (default 255)
    ignore_colors = [[0, 0, 0]]   # optional: palette colours that mean "not labelled"

    [[classes]]
    name = "background"
    color = [0, 0, 0]             # optional for class-index labels
    [[classes]]
    name = "road"
    color = [255, 0, 0]
    value = 255                   # optional: raw label value (default: the class position)

Class ids are positions in the list. Label values are mapped through ``value`` (default: the
position); the ignore index is never a class id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from shapely.errors import GEOSException

from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.raster import (
    crs_name,
    describe_grid,
    iter_row_windows,
    nodata_value,
    open_raster,
    read_masked,
    same_grid,
)

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]
#: Reads the class ids of one window of the image grid (ignore where unlabelled).
LabelReader = Callable[[Window], np.ndarray]

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
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
]  # fmt: skip
_VECTOR_SUFFIXES = {".geojson", ".json"}
_OTHER_VECTOR_SUFFIXES = {".shp", ".gpkg", ".kml", ".gml", ".fgb", ".parquet"}
_CLASS_KEYS = {"name", "color", "value"}
_TABLE_KEYS = {"classes", "ignore_index", "ignore_colors"}


def default_color(index: int) -> RGB:
    """A fixed display colour for class ``index`` (distinct for the first 20)."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    return ((index * 67) % 256, (index * 137) % 256, (index * 199) % 256)


def _rgb_code(rgb: np.ndarray) -> np.ndarray:
    """Pack uint8 R, G, B planes (3×…) into one integer per pixel."""
    rgb = rgb.astype(np.int64)
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def _format_counts(counts: dict[Any, int], unit: str, limit: int = 10) -> str:
    """``"7 (120 px), 9 (3 px)"``: the ``limit`` most frequent keys with their counts."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    text = ", ".join(f"{key} ({n} {unit})" for key, n in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class LabelClass:
    """One class: its name, display colour, and the raw label value that means it."""

    name: str
    color: RGB
    value: int


@dataclass
class ClassTable:
    """The classes of a label set and how raw labels map to class ids.

    Attributes:
        classes: Classes in class-id order.
        ignore_index: Label id for "not labelled" (nodata, unknown, out of image).
        ignore_colors: Palette colours that map to the ignore index.
        source: Where the table came from (file path, preset name or ``"inferred"``).
    """

    classes: list[LabelClass]
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
        for what, keys in (
            ("names", [c.name for c in self.classes]),
            ("values", [c.value for c in self.classes]),
        ):
            dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
            if dupes:
                raise InputError(f"{self.source}: duplicate class {what} {', '.join(dupes)}")
        self._values = np.array([c.value for c in self.classes], dtype=np.int64)
        self._colors = _rgb_code(np.array([c.color for c in self.classes], dtype=np.int64).T)

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

    def describe(self) -> list[dict[str, Any]]:
        """``[{"name": ..., "color": [r, g, b]}, ...]`` as written to stats.json."""
        return [{"name": c.name, "color": list(c.color)} for c in self.classes]

    def map_values(self, raw: np.ndarray) -> np.ndarray:
        """Map raw label values to class ids; other values (the ignore index, unless a class
        claims it as its ``value``, and NaN or infinite floats) → ignore."""
        if raw.dtype.kind != "f":
            return self._lookup(raw.astype(np.int64, copy=False), self._values, ())
        finite = np.isfinite(raw)
        ids = self._lookup(np.where(finite, raw, -1).astype(np.int64), self._values, ())
        ids[~finite] = self.ignore_index
        return ids

    def map_colors(self, rgb: np.ndarray) -> np.ndarray:
        """Map a 3×rows×cols uint8 RGB label array to class ids; unknown colours → ignore."""
        ignore = tuple(_rgb_code(np.array(c).reshape(3, 1))[0] for c in self.ignore_colors)
        return self._lookup(_rgb_code(rgb), self._colors, ignore)

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

    Args:
        data: The parsed TOML/JSON document (see the module docstring for its keys).
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
        classes.append(LabelClass(entry["name"], color, value))
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
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text), name
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise InputError(
                f"{path}: reading TOML needs Python 3.11+ or `pip install tomli`; "
                "or write the classes file as JSON"
            ) from exc
    try:
        return tomllib.loads(text), name
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); JSON files need a .json suffix") from exc


def load_classes(
    spec: str | os.PathLike, ignore_index: int | None = None, require_colors: bool = False
) -> ClassTable:
    """Load a classes file or preset (``isprs``) as a :class:`ClassTable`."""
    data, source = read_classes_document(spec)
    return parse_classes(data, source, ignore_index, require_colors)


# --- label sources -------------------------------------------------------------------------


def warn_unscored_labels(
    path: str, pixels: int, nodata_pixels: int, nodata: float | None, ignored: int, ignore: int
) -> None:
    """Warn about labelled pixels that are dropped without being a class: those equal to the
    label raster's nodata value (when it is not the ignore index) and those equal to the
    ignore index. Either may be a class by mistake: the background of a 0/1 mask whose
    nodata is 0, the objects of a 0/255 mask."""
    if nodata_pixels and nodata is not None and nodata != ignore:
        log.warning(
            "%s: %d px (%.1f%%) have the raster's nodata value %g and are ignored; if %g is "
            "a class (e.g. the background of a 0/1 mask), unset it: gdal_edit.py "
            "-unsetnodata %s",
            path, nodata_pixels, 100 * nodata_pixels / pixels, nodata, nodata, path,
        )  # fmt: skip
    if ignored:
        log.warning(
            "%s: %d px (%.1f%%) have value %d, the ignore index, and are ignored; if that "
            "value is a class (e.g. a 0/255 mask), map it with 'value' in a classes file or "
            "pass another --ignore-index",
            path, ignored, 100 * ignored / pixels, ignore,
        )  # fmt: skip


class RasterLabels:
    """A label raster on the image grid: class indexes (1 band) or RGB colours (3+ bands).

    Pixels masked in the label raster (its nodata value, alpha or mask) become ignore.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with open_raster(path) as src:
            self.palette = src.count >= 3
            if self.palette and src.dtypes[0] != "uint8":
                raise InputError(
                    f"{path}: a {src.count}-band label raster must be uint8 RGB colours, "
                    f"not {src.dtypes[0]}; give a 1-band class-index raster instead"
                )
            self.colormap: dict[int, tuple[int, ...]] | None = None
            self.nodata = nodata_value(src)
            if not self.palette:
                with contextlib.suppress(ValueError):  # no colour table
                    self.colormap = src.colormap(1)
        self.kind = "palette" if self.palette else "index"
        self._counts: Counter | None = None
        self._masked = 0  # pixels the label raster's mask leaves out

    def check_grid(self, image: str) -> None:
        """Refuse a label raster whose CRS, size or transform differs from the image's."""
        with open_raster(self.path) as lab, open_raster(image) as img:
            if same_grid(lab, img):
                return
            crs = crs_name(img.crs)
            target = f" -t_srs {crs}" if crs.startswith("EPSG:") else ""
            bounds = " ".join(f"{v:.10g}" for v in img.bounds)
            raise InputError(
                f"{self.path} ({describe_grid(lab)}) is not on the grid of {image} "
                f"({describe_grid(img)}); resample the labels onto the image grid, e.g. "
                f"gdalwarp -r near{target} -te {bounds} -ts {img.width} {img.height} "
                f"{self.path} aligned_labels.tif"
            )

    def counts(self) -> Counter:
        """Pixel counts of every raw value (index) or RGB colour (palette) over the raster."""
        if self._counts is None:
            counts: Counter = Counter()
            with open_raster(self.path) as src:
                bands = [1, 2, 3] if self.palette else [1]
                for window in iter_row_windows(src.width, src.height):
                    data, valid = read_masked(src, window, bands)
                    counts.update(self._count_block(data, valid))
                    self._masked += int(valid.size - np.count_nonzero(valid))
            self._counts = counts
        return self._counts

    def _count_block(self, data: np.ndarray, valid: np.ndarray) -> dict:
        if self.palette:
            codes, n = np.unique(_rgb_code(data[:, valid]), return_counts=True)
            return {
                (int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255): int(k)
                for c, k in zip(codes, n, strict=True)
            }
        values = data[0][valid]
        if values.dtype.kind == "f":
            if not np.all(values == np.round(values)):
                raise InputError(
                    f"{self.path}: class-index labels must be whole numbers; found fractions "
                    "(is this an image rather than a label raster?)"
                )
            values = values.astype(np.int64)
        if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
            n = np.bincount(values.ravel())
            return {int(v): int(n[v]) for v in np.flatnonzero(n)}
        uniq, n = np.unique(values, return_counts=True)
        return {int(v): int(k) for v, k in zip(uniq, n, strict=True)}

    def validate(self, table: ClassTable) -> None:
        """Refuse raw values or colours that the class table does not know."""
        counts = self.counts()
        if self.palette:
            unknown = table.unknown_colors(counts)
            if unknown:
                listed = _format_counts(
                    {f"({r},{g},{b})": n for (r, g, b), n in unknown.items()}, "px"
                )
                raise InputError(
                    f"{self.path}: {len(unknown)} colour(s) not in classes {table.source}: "
                    f"{listed}; add them to the classes file (or to ignore_colors)"
                )
        else:
            claimed = any(c.value == table.ignore_index for c in table.classes)
            warn_unscored_labels(
                self.path,
                sum(counts.values()) + self._masked,
                self._masked,
                self.nodata,
                0 if claimed else counts.get(table.ignore_index, 0),
                table.ignore_index,
            )
            unknown = table.unknown_values(counts)
            if unknown:
                raise InputError(
                    f"{self.path}: label value(s) {_format_counts(unknown, 'px')} are not among "
                    f"the {len(table.classes)} classes of {table.source}; fix the labels, add "
                    f"classes, or set the ignore index to them"
                )

    @contextlib.contextmanager
    def reader(self, table: ClassTable, image: rasterio.DatasetReader) -> Iterator[LabelReader]:
        """Yield a function that reads the class ids of a window."""
        with open_raster(self.path) as src:

            def read(window: Window) -> np.ndarray:
                data, valid = read_masked(src, window, [1, 2, 3] if self.palette else [1])
                ids = table.map_colors(data) if self.palette else table.map_values(data[0])
                ids[~valid] = table.ignore_index
                return ids

            yield read


def _geojson_crs(doc: dict, path: str) -> CRS | None:
    member = doc.get("crs")
    if member is None:
        return None
    props = member.get("properties", {}) if isinstance(member, dict) else {}
    spec = props.get("name") or (f"EPSG:{props['code']}" if "code" in props else None)
    try:
        return CRS.from_user_input(spec)
    except (CRSError, TypeError) as exc:
        raise InputError(f"{path}: unreadable 'crs' member {member!r}; remove or fix it") from exc


def _read_geojson(path: str) -> tuple[list[dict], CRS | None]:
    """GeoJSON features (dicts) and the CRS of the legacy ``crs`` member, if any."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable GeoJSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("type") not in ("FeatureCollection", "Feature"):
        raise InputError(f"{path}: not a GeoJSON Feature or FeatureCollection")
    features = doc.get("features", []) if doc["type"] == "FeatureCollection" else [doc]
    return features, _geojson_crs(doc, path)


def _read_ogr(path: str) -> tuple[list[dict], CRS | None]:
    """Features of the first layer of any vector format GDAL reads (GeoPackage, Shapefile,
    FlatGeobuf...), as GeoJSON-like dicts, and the layer's CRS; needs the optional
    ``pyogrio`` package (``pip install 'geoseg[vector]'``)."""
    try:
        import pyogrio
        from pyogrio.errors import DataLayerError, DataSourceError
    except ImportError:
        raise InputError(
            f"{path}: reading {Path(path).suffix} labels needs the optional vector reader: "
            f"pip install 'geoseg[vector]', or convert with "
            f"`ogr2ogr -f GeoJSON labels.geojson {path}`"
        ) from None
    try:
        layers = pyogrio.list_layers(path)
        meta, _, wkb, columns = pyogrio.raw.read(path, layer=0)
    except (DataSourceError, DataLayerError) as exc:
        raise InputError(f"{path}: not a readable vector file ({exc})") from exc
    if len(layers) > 1:
        log.info("%s: %d layers; reading the first, %r", path, len(layers), layers[0][0])
    try:
        crs = CRS.from_user_input(meta["crs"]) if meta["crs"] else None
    except CRSError as exc:
        raise InputError(f"{path}: unreadable CRS ({exc}); fix its projection") from exc
    geometries = shapely.from_wkb(wkb)
    names = [str(n) for n in meta["fields"]]
    rows = zip(*(c.tolist() for c in columns), strict=True) if names else ([] for _ in wkb)
    features = [
        {
            "geometry": None if g is None else json.loads(shapely.to_geojson(g)),
            "properties": dict(zip(names, row, strict=True)),
        }
        for g, row in zip(geometries, rows, strict=True)
    ]
    return features, crs


def _lonlat_bounds(geometries: list[dict]) -> bool:
    """Whether every coordinate of the geometries lies within lon/lat bounds (±180, ±90):
    in a projected CRS only the few hundred metres around its origin do."""
    try:
        shapes = shapely.from_geojson([json.dumps(g) for g in geometries])
    except (GEOSException, ValueError):
        return False  # reported when the polygons are used
    x0, y0, x1, y1 = shapely.total_bounds(shapes)
    return bool(max(-x0, x1) <= 180 and max(-y0, y1) <= 90)


def is_vector_path(path: str | os.PathLike) -> bool:
    """Whether a label path names vector polygons (by its suffix), not a label raster."""
    return Path(path).suffix.lower() in _VECTOR_SUFFIXES | _OTHER_VECTOR_SUFFIXES


class VectorLabels:
    """Vector polygons rasterised on the image grid in the image CRS: GeoJSON (read with
    json + shapely), or any vector format GDAL reads through the optional ``pyogrio``.

    Each feature's class comes from ``class_field`` (integer value or class name) or is the
    constant ``class_value``. Later features are drawn over earlier ones. Polygons are
    reprojected from the file's CRS; a file without one is taken as WGS 84 when every
    coordinate is a plausible lon/lat (RFC 7946 GeoJSON), else as being in the image CRS.
    """

    kind = "vector"

    def __init__(
        self, path: str, class_field: str | None = None, class_value: int | None = None
    ) -> None:
        self.path = path
        if class_field is not None and class_value is not None:
            raise UsageError("--class-field and --class-value exclude each other")
        if class_value is not None and class_value < 0:
            raise UsageError(f"--class-value must be ≥ 0, not {class_value}")
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file; check the path")
        if Path(path).suffix.lower() in _OTHER_VECTOR_SUFFIXES:
            features, self.crs = _read_ogr(path)
        else:
            features, self.crs = _read_geojson(path)
        features = [f for f in features if isinstance(f, dict) and f.get("geometry")]
        if not features:
            raise InputError(f"{path}: no features with a geometry; nothing to rasterise")
        self.geometries = [f["geometry"] for f in features]
        if self.crs is None and _lonlat_bounds(self.geometries):
            self.crs = CRS.from_epsg(4326)
            log.info(
                "%s has no CRS and lon/lat coordinates: taking them as WGS 84 (RFC 7946)", path
            )
        self.values = self._class_values(features, class_field, class_value)
        self._cache: dict[str, tuple[list, shapely.STRtree]] = {}

    def _class_values(
        self, features: list[dict], class_field: str | None, class_value: int | None
    ) -> list[int | str]:
        if class_field is None:
            value = 1 if class_value is None else class_value
            if class_value is None:
                log.info(
                    "%s: no --class-field/--class-value: every polygon is class value 1", self.path
                )
            return [value] * len(features)
        props = [f.get("properties") or {} for f in features]
        missing = [i for i, p in enumerate(props) if p.get(class_field) is None]
        if len(missing) == len(props):
            names = sorted({k for p in props for k in p})
            shown = ", ".join(names[:15]) + (", ..." if len(names) > 15 else "")
            raise InputError(
                f"{self.path}: no feature has attribute {class_field!r} (attributes: "
                f"{shown or 'none'}); pass an existing --class-field or --class-value N"
            )
        if missing:
            raise InputError(
                f"{self.path}: {len(missing)} of {len(props)} features have no {class_field!r} "
                f"value (first: feature {missing[0]}); fill them or use --class-value N"
            )
        values: list[int | str] = []
        for i, p in enumerate(props):
            v = p[class_field]
            if isinstance(v, str):
                values.append(v)
            elif (
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and float(v).is_integer()
                and v >= 0
            ):
                values.append(int(v))
            else:
                raise InputError(
                    f"{self.path}: feature {i} has {class_field}={v!r}; class attributes must "
                    "be class names or whole numbers ≥ 0"
                )
        if {type(v) for v in values} == {int, str}:
            raise InputError(
                f"{self.path}: attribute {class_field!r} mixes numbers and names; use one kind"
            )
        return values

    def counts(self) -> Counter:
        """Number of features per class value."""
        return Counter(self.values)

    def validate(self, table: ClassTable) -> None:
        """Refuse class values or names that the class table does not know."""
        counts = self.counts()
        names = set(table.names)
        unknown = {
            v: n
            for v, n in counts.items()
            if (v not in names if isinstance(v, str) else table.unknown_values({v: n}))
        }
        if unknown:
            raise InputError(
                f"{self.path}: class value(s) {_format_counts(unknown, 'features')} are not "
                f"among the classes of {table.source} ({', '.join(table.names)}); fix the "
                "attribute or the classes file"
            )

    def _ids(self, table: ClassTable) -> np.ndarray:
        if self.values and isinstance(self.values[0], str):
            return np.array([table.names.index(v) for v in self.values], dtype=np.int64)
        return table.map_values(np.array(self.values, dtype=np.int64)).astype(np.int64)

    def _geometries_in(self, image: rasterio.DatasetReader) -> tuple[list, shapely.STRtree]:
        """The polygons in the image CRS (reprojected once per CRS) and their search tree."""
        key = image.crs.to_wkt() if image.crs else ""
        if key in self._cache:
            return self._cache[key]
        reproject = self.crs is not None and image.crs is not None and self.crs != image.crs
        if self.crs is None:
            log.info(
                "%s has no CRS and coordinates outside lon/lat bounds: taking them to be in the "
                "image CRS (%s)",
                self.path,
                crs_name(image.crs),
            )
        elif image.crs is None:
            log.warning("%s: the image has no CRS; using polygon coordinates as-is", self.path)
        elif reproject:
            log.info(
                "%s: reprojecting polygons from %s to %s",
                self.path,
                crs_name(self.crs),
                crs_name(image.crs),
            )
        try:
            geoms = (
                transform_geom(self.crs, image.crs, self.geometries)
                if reproject
                else self.geometries
            )
            shapes = shapely.from_geojson([json.dumps(g) for g in geoms])
        except (GEOSException, ValueError) as exc:
            raise InputError(f"{self.path}: invalid geometry ({exc}); repair the file") from exc
        self._cache[key] = (shapes, shapely.STRtree(shapes))
        return self._cache[key]

    @contextlib.contextmanager
    def reader(self, table: ClassTable, image: rasterio.DatasetReader) -> Iterator[LabelReader]:
        """Yield a function that rasterises the polygons over a window of ``image``."""
        shapes, tree = self._geometries_in(image)
        ids = self._ids(table)
        if not tree.query(shapely.box(*image.bounds)).size:
            log.warning(
                "%s: no polygon overlaps %s; its labels are all background (a file without "
                "a CRS is read as WGS 84 lon/lat when its coordinates fit, else in the image "
                "CRS)",
                self.path,
                image.name,
            )

        def read(window: Window) -> np.ndarray:
            out_shape = (int(window.height), int(window.width))
            transform = window_transform(window, image.transform)
            bounds = rasterio.windows.bounds(window, image.transform)
            hits = np.sort(tree.query(shapely.box(*bounds)))
            if not hits.size:
                return np.full(out_shape, table.background, dtype=table.dtype)
            return rasterize(
                zip((shapes[i] for i in hits), (int(ids[i]) for i in hits), strict=True),
                out_shape=out_shape,
                transform=transform,
                fill=table.background,
                dtype=table.dtype,
            )

        yield read


LabelSource = RasterLabels | VectorLabels


def open_labels(
    path: str, class_field: str | None = None, class_value: int | None = None
) -> LabelSource:
    """Open a label source: vector polygons (GeoJSON, or GeoPackage, Shapefile and the other
    :data:`_OTHER_VECTOR_SUFFIXES` with ``pyogrio``) or a label raster."""
    if is_vector_path(path):
        return VectorLabels(path, class_field, class_value)
    return RasterLabels(path)


def resolve_classes(
    sources: list[LabelSource], classes: str | os.PathLike | None, ignore_index: int | None
) -> ClassTable:
    """The class table for a set of label sources, validated against every source.

    With ``classes`` (a file or preset), every label value, colour or class name must be in
    it. Without, classes are inferred: numbers 0..max found become ``class_0``..``class_N``
    (class 0 is ``background`` when polygons are involved, as pixels no polygon covers are
    class 0); class names from a vector attribute become ``background`` (0) followed by the
    sorted names. RGB label rasters always need a classes file.

    Raises:
        InputError: A label does not fit the classes.
        UsageError: RGB labels without a classes file.
    """
    if classes is not None:
        palette = any(s.kind == "palette" for s in sources)
        table = load_classes(classes, ignore_index, require_colors=palette)
    else:
        table = _infer_classes(sources, 255 if ignore_index is None else ignore_index)
    for source in sources:
        source.validate(table)
    log.info(
        "classes (%s): %s; ignore index %d",
        table.source,
        ", ".join(table.names),
        table.ignore_index,
    )
    return table


def _infer_classes(sources: list[LabelSource], ignore_index: int) -> ClassTable:
    palettes = [s.path for s in sources if s.kind == "palette"]
    if palettes:
        raise UsageError(
            f"{palettes[0]} holds RGB colours: pass --classes FILE (or --classes isprs) to map "
            "colours to classes"
        )
    found: set[int | str] = set()
    for source in sources:
        found |= {v for v in source.counts() if v != ignore_index}
    has_vectors = any(s.kind == "vector" for s in sources)
    names = {v for v in found if isinstance(v, str)}
    if names:
        if len(names) != len(found):
            raise InputError(
                "labels mix class names and class numbers across sources; give a classes file"
            )
        ordered = ["background", *sorted(names - {"background"})]
        return ClassTable(
            [LabelClass(n, default_color(i), i) for i, n in enumerate(ordered)],
            ignore_index,
        )
    if not found:
        raise InputError(
            f"{sources[0].path}: no label value other than the ignore index {ignore_index}; "
            "check the labels or --ignore-index"
        )
    top = max(found)
    if top >= ignore_index:
        raise InputError(
            f"{sources[0].path if len(sources) == 1 else 'labels'}: label value {top} is not "
            f"below the ignore index {ignore_index}; set --ignore-index higher or give a "
            "classes file"
        )
    if top == 0 and not has_vectors:
        log.warning(
            "the labels hold a single class (value 0); check the labels or the ignore index"
        )
    colormap = next((s.colormap for s in sources if s.kind == "index" and s.colormap), None)
    return ClassTable(
        [
            LabelClass(
                "background" if i == 0 and has_vectors else f"class_{i}",
                tuple(colormap[i][:3]) if colormap and i in colormap else default_color(i),
                i,
            )
            for i in range(top + 1)
        ],
        ignore_index,
    )
