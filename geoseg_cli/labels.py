"""Label sources of tile and evaluate: class-index rasters, RGB rasters, vector polygons."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from shapely.errors import GEOSException

from geoseg_cli.classes import ClassInfo, ClassTable, default_color, load_classes, rgb_code
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.image_inputs import ImageBands, unscored_under_data, warn_unscored_labels
from geoseg_cli.raster import (
    crs_name,
    describe_grid,
    iter_row_windows,
    nodata_value,
    open_raster,
    read_masked,
    same_grid,
)
from geoseg_cli.vector import is_vector_path, lonlat_bounds, read_features

log = logging.getLogger(__name__)

#: Reads the class ids of one window of the image grid (ignore where unlabelled).
LabelReader = Callable[[Window], np.ndarray]


def _format_counts(counts: dict[Any, int], unit: str, limit: int = 10) -> str:
    """``"7 (120 px), 9 (3 px)"``: the ``limit`` most frequent keys with their counts."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    text = ", ".join(f"{key} ({n} {unit})" for key, n in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


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
            codes, n = np.unique(rgb_code(data[:, valid]), return_counts=True)
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

    def validate(self, table: ClassTable, image: ImageBands | None = None) -> None:
        """Refuse raw values or colours that the class table does not know.

        Args:
            table: The classes.
            image: The image on the labels' grid (unscored pixels count where it has data).
        """
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
            pixels, masked = sum(counts.values()) + self._masked, self._masked
            ignored = 0 if claimed else counts.get(table.ignore_index, 0)
            if image is not None and (masked or ignored):
                ignore = None if claimed else table.ignore_index
                pixels, masked, ignored = unscored_under_data(self.path, image, ignore)
            warn_unscored_labels(
                self.path, pixels, masked, self.nodata, ignored, table.ignore_index
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


class VectorLabels:
    """Vector polygons rasterised on the image grid in the image CRS.

    GeoJSON (read with json + shapely), or any vector format GDAL reads through the optional
    ``pyogrio``.

    Each feature's class comes from ``class_field`` (integer value or class name) or is the
    constant ``class_value``. Later features are drawn over earlier ones. Polygons are
    reprojected from the file's CRS; a file without one is taken as WGS 84 when every
    coordinate is a plausible lon/lat (RFC 7946 GeoJSON), else as being in the image CRS.

    """

    kind = "vector"
    #: Pixels no feature covers get the background class (sparse labels: the ignore index).
    fills_background = True

    def __init__(
        self, path: str, class_field: str | None = None, class_value: int | None = None
    ) -> None:
        self.path = path
        if class_field is not None and class_value is not None:
            raise UsageError("--class-field and --class-value exclude each other")
        if class_value is not None and class_value < 0:
            raise UsageError(f"--class-value must be ≥ 0, not {class_value}")
        features, self.crs = read_features(path)
        features = [f for f in features if isinstance(f, dict) and f.get("geometry")]
        if not features:
            raise InputError(f"{path}: no features with a geometry; nothing to rasterise")
        self.geometries = [f["geometry"] for f in features]
        if self.crs is None and lonlat_bounds(self.geometries):
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
        shapes = self._repaired(shapes)
        self._cache[key] = (shapes, shapely.STRtree(shapes))
        return self._cache[key]

    def _repaired(self, shapes: np.ndarray) -> np.ndarray:
        """The shapes, invalid ones (self-intersecting rings ...) made valid, with a warning.

        A self-intersecting ring would be burnt with holes where it overlaps itself; the
        repair keeps the area its rings enclose (GEOS's "structure" method).
        """
        invalid = np.flatnonzero(~shapely.is_valid(shapes))
        if not invalid.size:
            return shapes
        first = shapely.is_valid_reason(shapes[invalid[0]])
        shapes = shapes.copy()
        shapes[invalid] = shapely.make_valid(
            shapes[invalid], method="structure", keep_collapsed=False
        )
        log.warning(
            "%s: %d invalid polygon(s) repaired with shapely.make_valid (first: feature %d, "
            "%s); check them (e.g. QGIS's Fix geometries)",
            self.path,
            invalid.size,
            invalid[0],
            first,
        )
        return shapes

    @contextlib.contextmanager
    def reader(self, table: ClassTable, image: rasterio.DatasetReader) -> Iterator[LabelReader]:
        """Yield a function that rasterises the polygons over a window of ``image``."""
        shapes, tree = self._geometries_in(image)
        ids = self._ids(table)
        sparse = int((shapely.get_dimensions(shapes) < 2).sum())
        if sparse and self.fills_background and table.background != table.ignore_index:
            raise InputError(
                f"{self.path}: {sparse} point or line feature(s) would be surrounded by "
                f"'{table.names[table.background]}', which fills every pixel no polygon "
                "covers: tile sparse points and scribbles with geoseg tile --sparse; score "
                "against them with a classes file without a background class"
            )
        if not tree.query(shapely.box(*image.bounds)).size:
            log.warning(
                "%s: no feature overlaps %s; its labels are all %s (a file without a CRS is "
                "read as WGS 84 lon/lat when its coordinates fit, else in the image CRS)",
                self.path,
                image.name,
                "background" if self.fills_background else "ignored",
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
    """Open a label source.

    Vector polygons (any of :data:`geoseg_cli.vector.FORMATS`) or a label raster.
    """
    if is_vector_path(path):
        return VectorLabels(path, class_field, class_value)
    return RasterLabels(path)


def resolve_classes(
    sources: list[LabelSource],
    classes: str | os.PathLike | None,
    ignore_index: int | None,
    images: list[ImageBands] | None = None,
) -> ClassTable:
    """The class table for a set of label sources, validated against every source.

    With ``classes`` (a file or preset), every label value, colour or class name must be in
    it. Without, classes are inferred: numbers 0..max found become ``class_0``..``class_N``
    (class 0 is ``background`` when polygons are involved, as pixels no polygon covers are
    class 0); class names from a vector attribute become ``background`` (0) followed by the
    sorted names. Sparse vector labels (``geoseg tile --sparse``) fill no background: their
    class 0 is ``class_0`` and their names are only those found. RGB label rasters always
    need a classes file. With ``images`` (the image each source labels), unscored label
    pixels are only reported where the image has data.

    Raises:
        InputError: A label does not fit the classes.
        UsageError: RGB labels without a classes file.
    """
    if classes is not None:
        palette = any(s.kind == "palette" for s in sources)
        table = load_classes(classes, ignore_index, require_colors=palette)
    else:
        table = _infer_classes(sources, 255 if ignore_index is None else ignore_index)
    for i, source in enumerate(sources):
        if source.kind == "index" and images is not None:
            source.validate(table, images[i])
        else:
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
    fills_background = any(getattr(s, "fills_background", False) for s in sources)
    names = {v for v in found if isinstance(v, str)}
    if names:
        if len(names) != len(found):
            raise InputError(
                "labels mix class names and class numbers across sources; give a classes file"
            )
        background = ["background"] if fills_background or "background" in names else []
        ordered = [*background, *sorted(names - {"background"})]
        return ClassTable(
            [ClassInfo(n, default_color(i), i) for i, n in enumerate(ordered)],
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
    if top == 0 and not fills_background:
        log.warning(
            "the labels hold a single class (value 0); check the labels or the ignore index"
        )
    colormap = next((s.colormap for s in sources if s.kind == "index" and s.colormap), None)
    return ClassTable(
        [
            ClassInfo(
                "background" if i == 0 and fills_background else f"class_{i}",
                tuple(colormap[i][:3]) if colormap and i in colormap else default_color(i),
                i,
            )
            for i in range(top + 1)
        ],
        ignore_index,
    )
