"""Class agreement of ``--engine shared`` with ``--engine window`` on a trained model.

Predicts RASTER with CHECKPOINT through both engines for each STRIDE:TTA configuration and
prints, over the valid pixels of the window engine's map: the share of pixels with the same
class, the same share among pixels the window engine is confident about (top probability
≥ 0.9), and the share of disagreeing pixels within 2 px (Euclidean, as ``geoseg evaluate
--boundary-erosion 2``) of a class boundary of the window engine's map.

Usage::

    python benchmarks/engine_agreement.py CHECKPOINT RASTER [--configs 112:flip 224:none]

The checkpoint decides what the number means: agreement is a property of the trained head
(how much its output depends on features at window borders, which the window engine computes
with zero padding and the shared engine with real context), not of the engine alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import rasterio
import torch

from geoseg_cli.allocator import keep_freed_memory
from geoseg_cli.inference import PredictOptions, load_runtime, predict_raster
from geoseg_cli.metrics import boundary_mask


def run(engine: object, raster: Path, out: Path, engine_name: str, stride: int, tta: str | None):
    options = PredictOptions(
        stride=stride, tta=tta, engine=engine_name, probabilities="float32", overwrite=True
    )
    start = time.perf_counter()
    predict_raster(engine, raster, out, options)
    seconds = time.perf_counter() - start
    with rasterio.open(out) as ds:
        classes = ds.read(1)
    with rasterio.open(out.with_name(out.stem + "_probabilities.tif")) as ds:
        top = ds.read().max(axis=0)
    return classes, top, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("raster", type=Path)
    parser.add_argument("--configs", nargs="+", default=["112:flip", "224:none"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--confident", type=float, default=0.9)
    args = parser.parse_args()
    keep_freed_memory()  # as the geoseg command does
    torch.set_num_threads(args.threads)
    engine = load_runtime(args.checkpoint, "cpu")
    print(f"model {args.checkpoint} (window {engine.info.window}), raster {args.raster}")
    print("| stride:TTA | window s | shared s | agreement | confident pixels | agreement there "
          "| disagreeing pixels within 2 px of a boundary |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            stride, tta = config.split(":")
            tta = None if tta == "none" else tta
            ref, top, t_window = run(engine, args.raster, Path(tmp, "w.tif"), "window",
                                     int(stride), tta)  # fmt: skip
            got, _, t_shared = run(engine, args.raster, Path(tmp, "s.tif"), "shared",
                                   int(stride), tta)  # fmt: skip
            valid = ref != 255
            same = got == ref
            confident = valid & (top >= args.confident)
            differ = valid & ~same
            near = boundary_mask(ref, 2)
            share = confident.sum() / valid.sum()
            print(f"| {config} | {t_window:.1f} | {t_shared:.1f} "
                  f"| {100 * same[valid].mean():.2f} % | {100 * share:.1f} % "
                  f"| {100 * same[confident].mean():.2f} % "
                  f"| {100 * (differ & near).sum() / max(differ.sum(), 1):.1f} % |")  # fmt: skip


if __name__ == "__main__":
    main()
