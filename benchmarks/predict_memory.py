"""Peak memory of ``geoseg predict`` versus raster size (DESIGN.md §6.

Memory must not grow with the raster height).

Each prediction runs in a fresh subprocess; its peak RSS is the ``ru_maxrss`` that
``os.wait4`` reports for that child. A baseline child only loads the model, so the table
also shows what the streaming pipeline itself adds.

Usage::

    python benchmarks/predict_memory.py                       # SCG-Net resnet18, T=256
    python benchmarks/predict_memory.py --engine stand-in     # cheap numpy engine
    python benchmarks/predict_memory.py --sizes 4096x4096 16384x4096 --markdown
    python benchmarks/predict_memory.py --predict-engine window   # the per-window method

Sizes are HEIGHTxWIDTH. Synthetic 3-band uint8 rasters (tiled, DEFLATE) are written once
to ``--data`` and reused.

"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import print_table

DEFAULT_SIZES = ("4096x4096", "8192x4096", "16384x4096", "4096x8192", "4096x16384")


def make_raster(path: Path, height: int, width: int) -> None:
    """A blocky 3-band uint8 scene with noise, written block row by block row."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32618",
        "transform": from_origin(583_000.0, 4_507_000.0, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    rng = np.random.default_rng(0)
    palette = rng.integers(30, 225, size=(6, 3)).astype(np.uint8)
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, height, 512):
            rows = min(512, height - row)
            cells = rng.integers(0, 6, size=(-(-rows // 32), -(-width // 32)))
            classes = np.kron(cells, np.ones((32, 32), dtype=np.int64))[:rows, :width]
            image = palette[classes].transpose(2, 0, 1)
            noise = rng.integers(-12, 13, size=image.shape, dtype=np.int16)
            block = np.clip(image + noise, 0, 255).astype(np.uint8)
            dst.write(block, window=Window(0, row, width, rows))
    tmp.rename(path)


def make_checkpoint(path: Path, window: int) -> None:
    """An untrained 3-class SCG-Net (scg-gcn, resnet18) checkpoint."""
    import torch

    from geoseg_cli.checkpoint import Checkpoint, ClassInfo, InputSpec, ModelSpec, save_checkpoint
    from models import create_model

    torch.manual_seed(0)
    model = create_model("scg-gcn", 3, 3, backbone="resnet18")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ckpt = Checkpoint(
        model=ModelSpec("scg-gcn", "resnet18", 3, 3),
        classes=[ClassInfo(n, c) for n, c in zip("abc", colours, strict=True)],
        ignore_index=255,
        input=InputSpec([1, 2, 3], "uint8", 1 / 255, [0.45] * 3, [0.25] * 3),
        window=window,
        state_dict=model.state_dict(),
    )
    save_checkpoint(ckpt, path)


class StandInEngine:
    """A cheap runtime (softmax of the scaled bands) for measuring the pipeline alone."""

    on_gpu = False
    output_stride = 16
    feature_channels = None
    streams = False

    def __init__(self, window: int) -> None:
        from geoseg_cli.checkpoint import ClassInfo, InputSpec, ModelInfo, ModelSpec

        self.info = ModelInfo(
            model=ModelSpec("stand-in", "none", 3, 3),
            classes=[ClassInfo(n, (0, 0, 0)) for n in "abc"],
            ignore_index=255,
            input=InputSpec([1, 2, 3], "uint8", 1 / 255, [0.0] * 3, [1.0] * 3),
            window=window,
        )
        self.model_hash = "stand-in"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        e = np.exp(8 * (batch - batch.max(axis=1, keepdims=True)))
        return e / e.sum(axis=1, keepdims=True)


def child(args: argparse.Namespace) -> None:
    """Runs in the subprocess: load the engine, predict (unless baseline), report JSON."""
    import torch

    from geoseg_cli.allocator import keep_freed_memory
    from geoseg_cli.inference import PredictOptions, predict_raster
    from geoseg_cli.inference.torch_runtime import TorchRuntime

    keep_freed_memory()  # as the geoseg command does
    torch.set_num_threads(args.threads)
    engine = (
        StandInEngine(args.window) if args.engine == "stand-in" else TorchRuntime(args.ckpt, "cpu")
    )
    start = time.perf_counter()
    result = {}
    if args.raster:
        options = PredictOptions(
            window=args.window,
            stride=args.stride,
            batch_size=args.batch_size,
            engine=args.predict_engine,
            overwrite=True,
        )
        out = predict_raster(engine, args.raster, args.output, options)
        result["windows"] = out.windows
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))


def measure(argv: list[str]) -> tuple[float, dict]:
    """Run one child; return (peak RSS MiB, its JSON report)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *argv], stdout=subprocess.PIPE, text=True
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(argv)}")
    return usage.ru_maxrss / 1024, json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["scg", "stand-in"], default="scg")
    parser.add_argument(
        "--predict-engine",
        choices=["shared", "window"],
        default="shared",
        help="predict's method (the stand-in always runs the window engine).",
    )
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/geoseg-bench"))
    parser.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raster", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    args.data.mkdir(parents=True, exist_ok=True)
    ckpt = args.data / f"scg-gcn-resnet18-{args.window}.pt"
    if not ckpt.exists():
        make_checkpoint(ckpt, args.window)
    common = ["--engine", args.engine, "--ckpt", str(ckpt), "--window", str(args.window),
              "--stride", str(args.stride), "--threads", str(args.threads),
              "--predict-engine", args.predict_engine]  # fmt: skip
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    baseline, _ = measure(common)
    rows = []
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        raster = args.data / f"scene_{height}x{width}.tif"
        if not raster.exists():
            make_raster(raster, height, width)
        output = args.data / f"scene_{height}x{width}_pred.tif"
        rss, report = measure([*common, "--raster", str(raster), "--output", str(output)])
        rows.append((height, width, report["windows"], report["seconds"], rss))
        print(f"{height}x{width}: {rss:.0f} MiB, {report['seconds']:.0f} s", file=sys.stderr)

    ref = next((r[4] for r in rows if (r[0], r[1]) == (4096, 4096)), rows[0][4])
    header = ("height x width", "windows", "time (s)", "peak RSS (MiB)", "vs 4096x4096",
              "pipeline (MiB)")  # fmt: skip
    lines = [(f"{h} x {w}", str(n), f"{s:.0f}", f"{rss:.0f}", f"{rss / ref:.3f}",
              f"{rss - baseline:.0f}") for h, w, n, s, rss in rows]  # fmt: skip
    print(f"engine: {args.engine} ({args.predict_engine}), window {args.window}, stride "
          f"{args.stride}, batch {args.batch_size or 'default'}, {args.threads} threads; "
          f"baseline (engine loaded, nothing predicted): {baseline:.0f} MiB")  # fmt: skip
    print_table(header, lines, args.markdown)


if __name__ == "__main__":
    main()
