"""``geoseg cluster`` against k-means on pixel values, scored after Hungarian matching.

For each scene, both methods cluster the same bands of the same raster into K clusters
without labels; each cluster map is then scored against the reference labels with
``geoseg evaluate --match hungarian`` (pixel accuracy = OA, and mIoU over the reference
classes). k-means runs on the standardized band values of the valid pixels (scikit-learn's
``KMeans`` with k-means++ and 4 restarts when installed, else geoseg's numpy k-means): the
per-pixel clustering a QGIS user would otherwise reach for.

Scenes:

- ``demo``: the synthetic scene of ``geoseg demo`` (``geoseg_cli.demo.write_scene``, seed 2,
  RGB with a nodata corner, 5 classes), K = 5;
- ``spacenet``: ``../shared/data/spacenet/sample_geotiff.tif`` (WorldView pan, uint16) with
  ``sample_geotiff_buildings_mask.tif`` (0 background, 1 building), K = 2 (and any
  ``--spacenet-k``).

Usage::

    nice -n 5 python benchmarks/cluster.py [--scenes demo spacenet] [--epochs 10] [--seeds 0 1]

Prints a Markdown table (and writes it with ``--markdown FILE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import numpy as np
import rasterio
import torch

from geoseg_cli.allocator import keep_freed_memory
from geoseg_cli.cluster import ClusterOptions, cluster_raster
from geoseg_cli.cluster_train import kmeans
from geoseg_cli.demo import write_scene
from geoseg_cli.evaluate import evaluate
from geoseg_cli.raster import output_profile, read_masked

SPACENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "spacenet"


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, str]:
    """Cluster the rows of ``x`` (pixels × bands); the labels and the implementation used."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        _, labels = kmeans(x, k, np.random.default_rng(seed), iterations=100)
        return labels, "geoseg_cli.cluster.kmeans (k-means++ seeds, Lloyd)"
    model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    return model.labels_, "scikit-learn KMeans (k-means++, 4 restarts)"


def kmeans_map(image: Path, out: Path, k: int, seed: int) -> str:
    """Write the k-means cluster map of ``image`` (nodata 255) on its grid."""
    with rasterio.open(image) as src:
        data, valid = read_masked(src)
        x = data[:, valid].T.astype(np.float64)
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-9)
        labels, name = kmeans_labels(x, k, seed)
        out_map = np.full(valid.shape, 255, dtype=np.uint8)
        out_map[valid] = labels
        with rasterio.open(
            out, "w", **output_profile(src, count=1, dtype="uint8", nodata=255)
        ) as dst:
            dst.write(out_map, 1)
    return name


def scenes(
    names: list[str], folder: Path, spacenet_k: list[int]
) -> list[tuple[str, Path, Path, int]]:
    """(name, image, labels, K) for each benchmark run."""
    runs = []
    if "demo" in names:
        image, labels = write_scene(folder, "demo", 1024, 2)
        runs.append(("demo scene (1024², RGB, 5 classes)", image, labels, 5))
    if "spacenet" in names:
        image = SPACENET / "sample_geotiff.tif"
        labels = SPACENET / "sample_geotiff_buildings_mask.tif"
        for k in spacenet_k:
            runs.append(("SpaceNet pan (900², uint16, buildings)", image, labels, k))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", nargs="+", default=["demo", "spacenet"])
    parser.add_argument("--spacenet-k", type=int, nargs="+", default=[2])
    parser.add_argument("--epochs", type=int, default=ClusterOptions.epochs)
    parser.add_argument("--train-windows", type=int, default=ClusterOptions.train_windows)
    parser.add_argument("--superpixels", type=int, default=ClusterOptions.superpixels)
    parser.add_argument("--window", type=int, default=ClusterOptions.window)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    keep_freed_memory()  # as the geoseg command does
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, image, labels, k in scenes(args.scenes, folder, args.spacenet_k):
            for seed in args.seeds:
                start = time.perf_counter()
                km_path = folder / f"kmeans_{k}_{seed}.tif"
                km_name = kmeans_map(image, km_path, k, seed)
                km_seconds = time.perf_counter() - start
                km = evaluate(km_path, labels, match="hungarian")
                options = ClusterOptions(
                    clusters=k,
                    epochs=args.epochs,
                    train_windows=args.train_windows,
                    superpixels=args.superpixels,
                    window=args.window,
                    seed=seed,
                    overwrite=True,
                )
                start = time.perf_counter()
                out = folder / f"cluster_{k}_{seed}.tif"
                cluster_raster(image, out, options)
                gc_seconds = time.perf_counter() - start
                gc = evaluate(out, labels, match="hungarian")
                rows.append(
                    (name, k, seed, km.oa, km.miou, km_seconds, gc.oa, gc.miou, gc_seconds, km_name)
                )
                print(
                    f"{name} K={k} seed={seed}: k-means OA {km.oa:.4f} mIoU {km.miou:.4f} "
                    f"({km_seconds:.0f} s) | geoseg cluster OA {gc.oa:.4f} mIoU {gc.miou:.4f} "
                    f"({gc_seconds:.0f} s)",
                    flush=True,
                )
    settings = dataclasses.replace(
        ClusterOptions(),
        epochs=args.epochs,
        train_windows=args.train_windows,
        superpixels=args.superpixels,
        window=args.window,
    )
    lines = [
        f"geoseg cluster: window {settings.window}, {settings.superpixels} superpixels, "
        f"{settings.epochs} epochs on {settings.train_windows} windows, batch "
        f"{settings.batch_size}; k-means: {rows[0][-1] if rows else '-'}.",
        "",
        "| scene | K | seed | k-means OA | k-means mIoU | geoseg cluster OA | geoseg cluster mIoU "
        "| OA gain (pts) | ≥ 5 pts? | k-means s | cluster s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, k, seed, km_oa, km_miou, km_s, gc_oa, gc_miou, gc_s, _ in rows:
        gain = 100 * (gc_oa - km_oa)
        lines.append(
            f"| {name} | {k} | {seed} | {100 * km_oa:.1f} % | {100 * km_miou:.1f} % | "
            f"{100 * gc_oa:.1f} % | {100 * gc_miou:.1f} % | {gain:+.1f} | "
            f"{'yes' if gain >= 5 else 'no'} | {km_s:.0f} | {gc_s:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
