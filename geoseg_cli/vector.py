"""Vector files: the formats geoseg reads and writes, polygons in and out, GeoJSON CRS members."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import shapely.geometry
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.features import shapes
from shapely.errors import GEOSException

from geoseg_cli.classes import ClassInfo
from geoseg_cli.errors import InputError, UsageError

log = logging.getLogger(__name__)

#: Vector formats by file suffix: the OGR driver that writes them through the optional
#: ``pyogrio``, or None for GeoJSON, which geoseg reads and writes itself. Every format is
#: both read (labels, reference polygons) and written (predicted polygons).
FORMATS: dict[str, str | None] = {
    ".geojson": None,
    ".json": None,
    ".gpkg": "GPKG",
    ".fgb": "FlatGeobuf",
    ".shp": "ESRI Shapefile",
    ".kml": "KML",
    ".gml": "GML",
}
_INSTALL = "pip install 'geoseg[vector]'"


def is_vector_path(path: str | os.PathLike) -> bool:
    """Whether a path names a vector file (by its suffix), not a raster."""
    return Path(path).suffix.lower() in FORMATS


def _driver(path: str | os.PathLike, action: str) -> str | None:
    """The OGR driver of ``path`` (None for GeoJSON), checking that it can be used.

    Raises:
        UsageError: An unknown suffix, or an OGR format without ``pyogrio`` installed.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(
            f"{path}: unknown vector format {suffix!r}; use one of {', '.join(FORMATS)}"
        )
    driver = FORMATS[suffix]
    if driver is not None and importlib.util.find_spec("pyogrio") is None:
        raise UsageError(
            f"{path}: {action} {suffix} files needs the optional vector support: {_INSTALL}, "
            "or use .geojson"
        )
    return driver


def check_writable(path: str | os.PathLike) -> None:
    """Refuse a vector output geoseg cannot write, before any work.

    Raises:
        UsageError: An unknown suffix, or an OGR format without ``pyogrio``.
    """
    _driver(path, "writing")


def crs_from_geojson(doc: dict, path: str | os.PathLike) -> CRS | None:
    """The CRS of a GeoJSON document's legacy (2008) ``crs`` member, or None without one.

    Raises:
        InputError: A ``crs`` member that names no known CRS.
    """
    member = doc.get("crs")
    if member is None:
        return None
    props = member.get("properties", {}) if isinstance(member, dict) else {}
    spec = props.get("name") or (f"EPSG:{props['code']}" if "code" in props else None)
    try:
        return CRS.from_user_input(spec)
    except (CRSError, TypeError) as exc:
        raise InputError(f"{path}: unreadable 'crs' member {member!r}; remove or fix it") from exc


def crs_to_geojson(crs: CRS | None) -> dict | None:
    """The legacy ``crs`` member GDAL and QGIS read: an OGC URN, else the WKT."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    if epsg == 4326:
        name = "urn:ogc:def:crs:OGC:1.3:CRS84"
    elif epsg is not None:
        name = f"urn:ogc:def:crs:EPSG::{epsg}"
    else:
        name = crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def read_features(path: str | os.PathLike) -> tuple[list[dict], CRS | None]:
    """GeoJSON-like features (dicts with ``geometry`` and ``properties``) and their CRS.

    GeoJSON is read with json; other formats (first layer) through ``pyogrio``.

    Raises:
        InputError: The file is missing or unreadable.
        UsageError: An OGR format without ``pyogrio``.
    """
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file; check the path")
    if _driver(path, "reading") is None:
        return _read_geojson(path)
    return _read_ogr(path)


def _read_geojson(path: str | os.PathLike) -> tuple[list[dict], CRS | None]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable GeoJSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("type") not in ("FeatureCollection", "Feature"):
        raise InputError(f"{path}: not a GeoJSON Feature or FeatureCollection")
    features = doc.get("features", []) if doc["type"] == "FeatureCollection" else [doc]
    return features, crs_from_geojson(doc, path)


def _read_ogr(path: str | os.PathLike) -> tuple[list[dict], CRS | None]:
    import pyogrio
    from pyogrio.errors import DataLayerError, DataSourceError

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


def lonlat_bounds(geometries: Sequence[dict]) -> bool:
    """Whether every coordinate lies within lon/lat bounds (±180, ±90).

    In a projected CRS only the few hundred metres around its origin do.
    """
    try:
        parsed = shapely.from_geojson([json.dumps(g) for g in geometries])
    except (GEOSException, ValueError):
        return False  # reported when the polygons are used
    x0, y0, x1, y1 = shapely.total_bounds(parsed)
    return bool(max(-x0, x1) <= 180 and max(-y0, y1) <= 90)


def write_class_polygons(
    raster: str | os.PathLike, target: str | os.PathLike, classes: Sequence[ClassInfo]
) -> int:
    """Polygonize a class map into ``target`` in the raster's CRS; the number of polygons.

    The whole map is polygonized at once (GDAL reads the band line by line), so polygons
    are merged across window borders; memory grows with the number of polygons, not with
    the raster. Nodata pixels give no polygon. Attributes: ``class_id`` and ``class``.

    Args:
        raster: Class-map GeoTIFF (uint8/uint16, nodata set).
        target: Vector file to write; its suffix picks the format (:data:`FORMATS`).
        classes: Class names by id.
    """
    driver = _driver(target, "writing")
    with rasterio.open(raster) as ds:
        polygons = (
            (geometry, int(value))
            for geometry, value in shapes(rasterio.band(ds, 1), transform=ds.transform)
            if int(value) != ds.nodata
        )
        if driver is None:
            return _write_geojson(polygons, ds.crs, target, classes)
        return _write_ogr(polygons, ds.crs, target, classes, driver)


def _write_geojson(
    polygons: Iterable[tuple[dict, int]],
    crs: CRS | None,
    target: str | os.PathLike,
    classes: Sequence[ClassInfo],
) -> int:
    """Stream (geometry, class id) pairs into a FeatureCollection."""
    count = 0
    with open(target, "w", encoding="utf-8") as f:
        header: dict[str, Any] = {"type": "FeatureCollection", "name": Path(target).stem}
        member = crs_to_geojson(crs)
        if member:
            header["crs"] = member
        f.write(json.dumps(header)[:-1] + ', "features": [\n')
        for geometry, class_id in polygons:
            feature = {
                "type": "Feature",
                "properties": {"class_id": class_id, "class": classes[class_id].name},
                "geometry": geometry,
            }
            f.write((",\n" if count else "") + json.dumps(feature))
            count += 1
        f.write("\n]}\n")
    return count


def _write_ogr(
    polygons: Iterable[tuple[dict, int]],
    crs: CRS | None,
    target: str | os.PathLike,
    classes: Sequence[ClassInfo],
    driver: str,
) -> int:
    """Write (geometry, class id) pairs with pyogrio, one layer named after the file."""
    import pyogrio.raw

    geometries, ids = [], []
    for geometry, class_id in polygons:
        geometries.append(shapely.geometry.shape(geometry))
        ids.append(class_id)
    names = np.array([classes[i].name for i in ids], dtype=object)
    pyogrio.raw.write(
        target,
        shapely.to_wkb(geometries),
        [np.array(ids, dtype=np.int32), names],
        fields=["class_id", "class"],
        geometry_type="Polygon",
        crs=crs.to_wkt() if crs else None,
        layer=Path(target).stem,
        driver=driver,
    )
    return len(ids)
