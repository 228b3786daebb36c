"""Shared-backbone vs window engine of ``geoseg predict``, measured in one run.

Both engines predict the same raster with the same model, window, stride and TTA through
the full pipeline (read, windows, blending, GeoTIFF writing); the table gives wall time,
effective throughput (raster Mpx/s), the shared engine's speed-up, the class agreement of
the two maps, and the ratio of each time to the one-pass-per-pixel bound: the time the
backbone alone needs to run once over the raster's area, from the backbone's FLOPs per
pixel (``torch.utils.flop_counter`` on one window) and the best FLOP rate measured on 1 or 4
windows on this machine. It also prints what one window and view costs the whole network
(batch 1) and the head with its output alone (upsampling, softmax, view mean; 15 per pass):
their ratio caps the shared engine's speed-up, however cheap its backbone pass.

Usage::

    python benchmarks/predict_engines.py                        # CPU, scg-gcn resnet50, T=448
    python benchmarks/predict_engines.py --window-batch-sizes 4 1 --markdown
    python benchmarks/predict_engines.py --runtime onnx                  # ONNX Runtime, CPU
    python benchmarks/predict_engines.py --size 4096 --configs 224:none --repeat 3  # best of 3
    python benchmarks/predict_engines.py --device cuda --size 8192 --batch-size 32  # on a GPU

The model is untrained (timings do not depend on the weights; the class agreement of an
untrained network is only indicative — see the README for agreement on trained models).
The raster is the demo's synthetic orthophoto (``geoseg demo``'s generator), tiled GeoTIFF.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import rasterio
import torch
from common import print_table, write_checkpoint, write_scene
from torch.utils.flop_counter import FlopCounterMode

from geoseg_cli.allocator import keep_freed_memory
from geoseg_cli.export.onnx import export_onnx
from geoseg_cli.inference import PredictOptions, predict_raster
from geoseg_cli.inference.onnx_runtime import OnnxRuntime
from geoseg_cli.inference.torch_runtime import TorchRuntime
from models import mean_probabilities


def backbone_rate(engine: TorchRuntime, window: int, rounds: int) -> tuple[float, float]:
    """(backbone FLOPs per pixel, best measured backbone FLOP/s on 1 or 4 windows)."""
    x = np.random.default_rng(0).random((4, 3, window, window), dtype=np.float32)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.module.features(torch.from_numpy(x[:1]))
    per_pixel = counter.get_total_flops() / window**2
    best = 0.0
    for batch in (1, 4):
        engine.features(x[:batch])  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            engine.features(x[:batch])
            best = max(best, per_pixel * batch * window**2 / (time.perf_counter() - start))
    return per_pixel, best


def head_share(engine: TorchRuntime, window: int, rounds: int) -> tuple[float, float]:
    """Seconds per window of the whole network and per window and view of the head alone.

    The whole network at batch 1; the head and output with 5 windows × 3 views per pass,
    probabilities per window: what the window engine and the shared engine each spend on one
    window and view besides reading and blending. Their ratio caps the shared engine's
    speed-up whatever its backbone costs.
    """
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, window, window), dtype=np.float32)
    features = engine.features(rng.random((15, 3, window, window), dtype=np.float32))

    def head(features: np.ndarray) -> None:
        logits = torch.from_numpy(engine.head_logits(features))
        for views in logits.split(3):
            mean_probabilities(views)

    def best(fn: object, *args: np.ndarray) -> float:
        fn(*args)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(engine.predict, image), best(head, features) / len(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1344, help="Raster side (px).")
    parser.add_argument("--window", type=int, default=448)
    parser.add_argument("--variant", default="scg-gcn")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["112:flip", "224:none"],
        help="STRIDE:TTA pairs (TTA none, flip or d4).",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="Shared engine: windows per head pass."
    )
    parser.add_argument(
        "--window-batch-sizes",
        type=int,
        nargs="+",
        default=[4],
        help="Window engine: images per pass, one run each (speed-ups are against the first).",
    )
    parser.add_argument("--tile", type=int, default=None, help="Shared engine tile side (px).")
    parser.add_argument("--halo", type=int, default=None, help="Shared engine halo (px).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="Engine runtime: PyTorch, or ONNX Runtime on the exported graphs (the FLOP-rate "
        "probe always uses PyTorch).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of the FLOP-rate probe.")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Runs of each engine, interleaved; the table gives the fastest (as timeit does: "
        "the least disturbed by other work on the machine).",
    )
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="Leave glibc's malloc as it is (the geoseg command keeps freed memory for reuse).",
    )
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "geoseg-eng")
    parser.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    args = parser.parse_args()

    if not args.glibc_default:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    args.data.mkdir(parents=True, exist_ok=True)
    raster = args.data / f"scene_{args.size}.tif"
    if not raster.exists():
        write_scene(raster, args.size)
    ckpt = args.data / f"{args.variant}-{args.backbone}-{args.window}.pt"
    if not ckpt.exists():
        write_checkpoint(ckpt, args.variant, args.backbone, args.window)
    torch_engine = TorchRuntime(ckpt, args.device)
    per_pixel, rate = backbone_rate(torch_engine, args.window, args.rounds)
    engine = torch_engine
    if args.runtime == "onnx":
        model = ckpt.with_suffix(".onnx")
        # a new export when there is none or an older one without usable split graphs; an
        # untrained resnet50 needs a looser float32 tolerance
        if not model.exists() or OnnxRuntime(model, args.device).feature_channels is None:
            export_onnx(ckpt, model, tolerance=0.05, overwrite=True)
        engine = OnnxRuntime(model, args.device, threads=args.threads)
    pixels = args.size**2
    bound = pixels * per_pixel / rate
    whole, head = head_share(torch_engine, args.window, args.rounds)
    print(
        f"per window and view: whole network {1e3 * whole:.1f} ms (batch 1), head and output "
        f"{1e3 * head:.1f} ms (15 per pass): the shared engine cannot beat the window engine "
        f"by more than {whole / head:.1f}x",
        file=sys.stderr,
    )
    print(
        f"{args.variant}/{args.backbone}, window {args.window}, {args.size}x{args.size} px, "
        f"{args.runtime} on {args.device}, {args.threads} threads: backbone "
        f"{per_pixel / 1e3:.1f} kFLOP/px, "
        f"{rate / 1e9:.1f} GFLOP/s (best of 1 and 4 windows) -> one pass over the raster "
        f"{bound:.1f} s",
        file=sys.stderr,
    )

    extra = {k: v for k, v in (("tile", args.tile), ("halo", args.halo)) if v is not None}
    rows = []
    for config in args.configs:
        stride, tta = config.split(":")
        tta = None if tta == "none" else tta
        runs = [("window", b) for b in args.window_batch_sizes] + [("shared", args.batch_size)]
        best = [float("inf")] * len(runs)
        for _ in range(args.repeat):  # interleaved, so that a slow spell hits both engines
            for i, (name, batch) in enumerate(runs):
                options = PredictOptions(
                    window=args.window, stride=int(stride), tta=tta, batch_size=batch,
                    engine=name, overwrite=True, **extra,
                )  # fmt: skip
                out = args.data / f"pred_{name}_{stride}_{tta}.tif"
                start = time.perf_counter()
                result = predict_raster(engine, raster, out, options)
                seconds = time.perf_counter() - start
                best[i] = min(best[i], seconds)
                print(f"{config} {name} (batch {batch or 'default'}): {seconds:.1f} s, "
                      f"{result.windows} windows", file=sys.stderr)  # fmt: skip
        reference = None
        for (name, batch), seconds in zip(runs, best, strict=True):
            with rasterio.open(args.data / f"pred_{name}_{stride}_{tta}.tif") as ds:
                classes, tags = ds.read(1), ds.tags()
            if reference is None:
                reference = (seconds, classes)
            valid = reference[1] != 255
            agreement = (classes[valid] == reference[1][valid]).mean()
            label = f"{name} (batch {batch or 'default'})"
            rows.append([config, label, tags["STRIDE"], f"{seconds:.1f}",
                         f"{pixels / seconds / 1e6:.3f}", f"{reference[0] / seconds:.2f}x",
                         f"{seconds / bound:.2f}", f"{100 * agreement:.2f}%"])  # fmt: skip

    header = ["stride:TTA", "engine", "stride used", "seconds", "Mpx/s", "speed-up",
              "x one-pass bound", "classes as first row"]  # fmt: skip
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
