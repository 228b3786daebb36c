"""Inputs that used to be taken silently: swapped --bounds and self-intersecting label polygons."""

from __future__ import annotations

import logging

import numpy as np
import rasterio
import shapely
from click.testing import CliRunner
from conftest import UTM_TRANSFORM, write_geojson
from rasterio.features import rasterize
from test_tile import mosaic_labels

from geoseg_cli.cli import cli
from geoseg_cli.tiling import tile


def test_bounds_with_left_beyond_right_are_refused(scene, tiny_checkpoint, tmp_path) -> None:
    with rasterio.open(scene["image"]) as src:
        left, bottom, right, top = src.bounds
    out = tmp_path / "pred.tif"
    swapped = [str(v) for v in (right, bottom, left, top)]
    result = CliRunner().invoke(
        cli,
        ["predict", str(scene["image"]), "-m", str(tiny_checkpoint), "-o", str(out), "--bounds",
         *swapped],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "give LEFT BOTTOM RIGHT TOP with left < right and bottom < top" in result.output
    assert not out.exists()


def test_self_intersecting_polygons_are_repaired_with_a_warning(scene, tmp_path, caplog) -> None:
    """A ring crossing itself (a bow tie) is burnt as the two triangles it encloses."""
    corners = [(10, 20), (60, 60), (60, 20), (10, 60), (10, 20)]  # pixel (col, row) edges
    bowtie = {"type": "Polygon", "coordinates": [[UTM_TRANSFORM @ c for c in corners]]}
    vectors = write_geojson(tmp_path / "v.geojson", [(bowtie, {})])
    out = tmp_path / "chips"
    with caplog.at_level(logging.WARNING, logger="geoseg_cli"):
        tile([scene["image"]], [vectors], out, size=32, class_value=1)
    assert "1 invalid polygon(s) repaired with shapely.make_valid (first: feature 0" in caplog.text
    repaired = shapely.make_valid(shapely.geometry.shape(bowtie), method="structure")
    assert repaired.geom_type == "MultiPolygon" and len(repaired.geoms) == 2
    reference = rasterize([(repaired, 1)], out_shape=(67, 93), transform=UTM_TRANSFORM)
    labels = mosaic_labels(out, (67, 93))
    valid = labels != 255
    np.testing.assert_array_equal(labels[valid], reference[valid])
    assert (labels[valid] == 1).sum() > 0
