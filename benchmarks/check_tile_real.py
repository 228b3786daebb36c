"""Manual check of ``geoseg tile`` on real SpaceNet rasters and polygons (not run by CI).

For each image + GeoJSON pair: tile with a grid whose size does not divide the raster (edge
chips are shifted inside), mosaic the label chips back onto the image grid, and compare with
a reference mask; check that every chip's CRS and transform equal the source window's and
that image chips hold the source pixels.

References: ``sample_geotiff_buildings_mask.tif`` (shipped with the data) for the UTM pair
and for the same polygons converted here to longitude/latitude (exercises reprojection); for
the WKT-only Albers pair, the polygons rasterised here with rasterio.features.rasterize.

Usage: python benchmarks/check_tile_real.py [DATA_DIR]   (default ../shared/data/spacenet)
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg_cli.tiling import tile

IGNORE = 255


def check_pair(image: Path, labels: Path, reference: np.ndarray, size: int, out: Path) -> dict:
    """Tile, mosaic the label chips back and compare with ``reference``."""
    start = time.perf_counter()
    summary = tile([str(image)], [str(labels)], out, size=size, max_nodata=1.0, val_fraction=0)
    seconds = time.perf_counter() - start
    with rasterio.open(image) as src:
        mosaic = np.full((src.height, src.width), IGNORE, dtype=np.uint8)
        worst_shift = 0.0
        pixels_equal = True
        with open(out / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            window = Window(
                int(row["col_off"]), int(row["row_off"]), int(row["width"]), int(row["height"])
            )
            expected = window_transform(window, src.transform)
            with rasterio.open(out / row["label"]) as lab, rasterio.open(out / row["image"]) as img:
                for chip in (lab, img):
                    assert chip.crs == src.crs, f"{chip.name}: CRS differs from the source"
                    shift = max(abs(a - b) for a, b in zip(chip.transform, expected, strict=True))
                    worst_shift = max(worst_shift, shift)
                assert lab.nodata == IGNORE and img.nodata == src.nodata
                pixels_equal &= bool(np.array_equal(img.read(), src.read(window=window)))
                r, c = int(row["row_off"]), int(row["col_off"])
                mosaic[r : r + lab.height, c : c + lab.width] = lab.read(1)
        valid = src.dataset_mask() > 0
    covered = mosaic != IGNORE
    return {
        "image": image.name,
        "chips": sum(summary.num_chips.values()),
        "seconds": seconds,
        "agreement_all": float((mosaic == reference).mean()),
        "agreement_labelled": float((mosaic[covered] == reference[covered]).mean()),
        "unlabelled_px": int((~covered).sum()),
        "image_nodata_px": int((~valid).sum()),
        "max_transform_diff": worst_shift,
        "image_pixels_equal": pixels_equal,
        "crs_epsg": None
        if src.crs.to_epsg(confidence_threshold=100) is None
        else src.crs.to_epsg(),
    }


def main(data: Path) -> None:
    with rasterio.open(data / "sample_geotiff_buildings_mask.tif") as ref:
        buildings = ref.read(1)
    custom = data / "sample_geotiff_custom_proj.tif"
    features = json.loads((data / "geotiff_custom_proj_labels.geojson").read_text())["features"]
    with rasterio.open(custom) as src:
        pivots = rasterize(
            [(f["geometry"], 1) for f in features],
            out_shape=(src.height, src.width),
            transform=src.transform,
            fill=0,
            dtype="uint8",
        )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(
            check_pair(data / "sample_geotiff.tif", data / "geotiff_labels.geojson",
                       buildings, 256, Path(tmp) / "utm")
        )  # fmt: skip
        lonlat = json.loads((data / "geotiff_labels.geojson").read_text())
        for feature in lonlat["features"]:
            feature["geometry"] = transform_geom("EPSG:32616", "OGC:CRS84", feature["geometry"])
        lonlat["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}
        (Path(tmp) / "lonlat.geojson").write_text(json.dumps(lonlat))
        results.append(
            check_pair(data / "sample_geotiff.tif", Path(tmp) / "lonlat.geojson", buildings, 256,
                       Path(tmp) / "lonlat")
        )  # fmt: skip
        results[-1]["image"] += " (lon/lat polygons)"
        results.append(
            check_pair(custom, data / "geotiff_custom_proj_labels.geojson", pivots, 200,
                       Path(tmp) / "albers")
        )  # fmt: skip
    cols = ["image", "chips", "seconds", "agreement_all", "agreement_labelled", "unlabelled_px",
            "image_nodata_px", "max_transform_diff", "image_pixels_equal", "crs_epsg"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = [
            f"{r[c]:.4%}" if c.startswith("agreement") else f"{r[c]:.2f}" if c == "seconds"
            else f"{r[c]:g}" if c == "max_transform_diff" else str(r[c])
            for c in cols
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    failed = [r["image"] for r in results if r["agreement_all"] < 0.995 or r["max_transform_diff"]]
    if failed:
        sys.exit(f"FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "spacenet"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
