"""geoseg tile with vector labels: reprojection, formats, layers, WKT-only CRSs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import ALBERS_WKT, UTM_CRS, UTM_TRANSFORM, write_geojson
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.warp import transform_geom
from rasterio.windows import transform as window_transform
from test_tile import mosaic_labels, read_manifest, utm_box, window_of

from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.tiling import tile


def write_vectors(path: Path, features: list[tuple[dict, dict]], crs: str, **kwargs) -> Path:
    """Write (geometry, properties) pairs as GeoJSON, or with pyogrio in the suffix's format.

    GeoPackage, Shapefile...; ``kwargs`` go to ``pyogrio.raw.write``.
    """
    if path.suffix == ".geojson":
        return write_geojson(path, features, crs=crs)
    import pyogrio.raw
    import shapely

    fields = sorted({k for _, props in features for k in props})
    pyogrio.raw.write(
        path,
        shapely.to_wkb([shapely.geometry.shape(g) for g, _ in features]),
        [np.array([props[k] for _, props in features]) for k in fields],
        fields=fields, geometry_type="Polygon", crs=crs, **kwargs,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg", ".shp"])
def test_vector_labels_reprojected_with_class_names(scene, tmp_path: Path, suffix) -> None:
    """Lon/lat polygons in GeoJSON, GeoPackage or Shapefile give the same chips."""
    triangle = {
        "type": "Polygon",
        "coordinates": [
            [UTM_TRANSFORM @ c for c in [(50.3, 10.7), (90.1, 31.3), (60.6, 59.9), (50.3, 10.7)]]
        ],
    }
    utm = [
        (utm_box(5, 20, 40, 50), {"kind": "pool"}),
        (triangle, {"kind": "house"}),
        (utm_box(30, 40, 70, 66), {"kind": "house"}),
    ]
    lonlat = [(transform_geom(UTM_CRS, "EPSG:4326", g), p) for g, p in utm]
    vectors = write_vectors(tmp_path / f"v{suffix}", lonlat, "urn:ogc:def:crs:OGC:1.3:CRS84")
    out = tmp_path / "chips"
    tile([scene["image"]], [vectors], out, size=32, class_field="kind", split="random")

    names = {"background": 0, "house": 1, "pool": 2}
    reference = rasterize(
        [(g, names[p["kind"]]) for g, p in utm], out_shape=(67, 93), transform=UTM_TRANSFORM
    ).astype(np.int64)
    reference[:10, :12] = 255  # image nodata
    np.testing.assert_array_equal(mosaic_labels(out, (67, 93)), reference)
    stats = json.loads((out / "stats.json").read_text())
    assert [c["name"] for c in stats["classes"]] == ["background", "house", "pool"]


def test_vector_without_crs_is_in_image_crs_with_class_value(scene, tmp_path, caplog) -> None:
    vectors = write_geojson(tmp_path / "v.geojson", [(utm_box(0, 30, 93, 40), {})])
    out = tmp_path / "chips"
    with caplog.at_level(logging.INFO, logger="geoseg_cli"):
        tile([scene["image"]], [vectors], out, size=32, class_value=3, split="random")
    assert "coordinates outside lon/lat bounds: taking them to be in the image CRS" in caplog.text
    stats = json.loads((out / "stats.json").read_text())
    assert [c["name"] for c in stats["classes"]] == ["background", "class_1", "class_2", "class_3"]
    mosaic = mosaic_labels(out, (67, 93))
    assert (mosaic[30:40] == 3).all() and (mosaic[40:] == 0).all() and (mosaic[10:30] == 0).all()


def test_vector_without_crs_in_lonlat_is_wgs84(scene, tmp_path, caplog) -> None:
    """RFC 7946 GeoJSON (no crs member, lon/lat) over the UTM scene: reprojected."""
    box = transform_geom(UTM_CRS, "EPSG:4326", utm_box(0, 30, 93, 40))
    vectors = write_geojson(tmp_path / "v.geojson", [(box, {})])
    with caplog.at_level(logging.INFO, logger="geoseg_cli"):
        tile([scene["image"]], [vectors], tmp_path / "chips", size=32, split="random")
    assert "has no CRS and lon/lat coordinates: taking them as WGS 84" in caplog.text
    mosaic = mosaic_labels(tmp_path / "chips", (67, 93))
    assert (mosaic[31:39, 12:] == 1).all() and (mosaic[41:] == 0).all()


def test_other_vector_formats_layers_and_errors(scene, tmp_path, caplog, monkeypatch) -> None:
    """A GeoPackage's first layer is read (and said so).

    Numeric classes; unreadable or missing files and a missing pyogrio give one-line errors that
    say what to do.
    """
    crs = UTM_CRS.to_wkt()
    path = write_vectors(tmp_path / "v.gpkg", [(utm_box(0, 30, 93, 40), {"id": 2})], crs)
    write_vectors(path, [(utm_box(0, 50, 93, 60), {"id": 1})], crs, layer="second")
    out = tmp_path / "chips"
    with caplog.at_level(logging.INFO, logger="geoseg_cli"):
        tile([scene["image"]], [path], out, size=32, class_field="id", split="random")
    assert "2 layers; reading the first, 'v'" in caplog.text
    mosaic = mosaic_labels(out, (67, 93))
    assert (mosaic[30:40] == 2).all() and (mosaic[40:] == 0).all()

    bad = tmp_path / "bad.gpkg"
    bad.write_bytes(b"not a geopackage")
    with pytest.raises(InputError, match=r"bad\.gpkg: not a readable vector file"):
        tile([scene["image"]], [bad], tmp_path / "o1", size=32)
    with pytest.raises(InputError, match=r"nope\.shp: no such file"):
        tile([scene["image"]], [tmp_path / "nope.shp"], tmp_path / "o2", size=32)
    monkeypatch.setitem(sys.modules, "pyogrio", None)  # not installed
    with pytest.raises(UsageError, match=r"v\.gpkg: reading \.gpkg files needs the optional "
                       r"vector support: pip install 'geoseg\[vector\]'"):  # fmt: skip
        tile([scene["image"]], [path], tmp_path / "o3", size=32)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_wkt_only_crs_image_and_vectors(make_raster, tmp_path: Path) -> None:
    transform = from_origin(-673_425.0, 2_130_165.0, 30.0, 30.0)
    image = np.full((3, 41, 37), 500, dtype=np.int16)
    image[:, :, :4] = -9999
    path = make_raster("albers.tif", image, crs=ALBERS_WKT, transform=transform, nodata=-9999)
    corners = [(10, 5), (30, 5), (30, 20), (10, 5)]
    geom = {"type": "Polygon", "coordinates": [[transform @ c for c in corners]]}
    vectors = write_geojson(tmp_path / "fields.geojson", [(geom, {"id": 1})])
    out = tmp_path / "chips"
    tile([path], [vectors], out, size=20, class_field="id", split="random")
    with rasterio.open(path) as src:
        source_crs = src.crs
        reference = rasterize([(geom, 1)], out_shape=(41, 37), transform=transform)
    reference = np.where(image[0] == -9999, 255, reference)
    np.testing.assert_array_equal(mosaic_labels(out, (41, 37)), reference)
    stats = json.loads((out / "stats.json").read_text())
    assert CRS.from_wkt(stats["crs"]) == source_crs
    assert stats["nodata"] == -9999 and stats["scale"] == 1e-4 and stats["dtype"] == "int16"
    for row in read_manifest(out):
        with rasterio.open(out / row["image"]) as img:
            assert img.crs == source_crs and img.nodata == -9999
            assert img.transform == window_transform(window_of(row), transform)
