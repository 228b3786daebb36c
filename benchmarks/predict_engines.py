"""Shared-backbone vs window engine of ``geoseg predict``, measured in one run (issue 8).

Both engines predict the same raster with the same model, window, stride and TTA through
the full pipeline (read, windows, blending, GeoTIFF writing); the table gives wall time,
effective throughput (raster Mpx/s), the shared engine's speed-up, the class agreement of
the two maps, and the ratio of each time to the one-pass-per-pixel bound: the time the
backbone alone needs to run once over the raster's area, from the backbone's FLOPs per
pixel (``torch.utils.flop_counter`` on one window) and the best FLOP rate measured on 1 or 4
windows on this machine. It also prints what one window and view costs the whole network
(batch 1) and the head with its output alone (upsampling and softmax, 16 windows per pass):
their ratio caps the shared engine's speed-up, however cheap its backbone pass.

Usage::

    python benchmarks/predict_engines.py                        # CPU, scg-gcn resnet50, T=448
    python benchmarks/predict_engines.py --window-batch-sizes 4 1 --markdown
    python benchmarks/predict_engines.py --runtime onnx                  # ONNX Runtime, CPU
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
from torch.utils.flop_counter import FlopCounterMode

from geoseg_cli.checkpoint import (
    Checkpoint,
    InputSpec,
    ModelSpec,
    create_model_from_spec,
    save_checkpoint,
)
from geoseg_cli.demo import DEMO_CLASSES, DEMO_CRS, make_scene, scene_transform
from geoseg_cli.engine import TorchEngine
from geoseg_cli.export import export_onnx
from geoseg_cli.onnx_engine import OnnxEngine
from geoseg_cli.predict import PredictOptions, predict_raster


def write_scene(path: Path, size: int) -> None:
    """The demo's synthetic scene (size×size, 3-band uint8, UTM 0.5 m) as a tiled GeoTIFF."""
    image, _ = make_scene(size, seed=1)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
        "crs": DEMO_CRS, "transform": scene_transform(size, 1), "tiled": True,
        "blockxsize": 256, "blockysize": 256, "compress": "deflate",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)


def write_checkpoint(path: Path, variant: str, backbone: str, window: int) -> None:
    """An untrained checkpoint of the demo's 5 classes."""
    torch.manual_seed(0)
    spec = ModelSpec(variant, backbone, num_classes=len(DEMO_CLASSES), in_channels=3)
    ckpt = Checkpoint(
        model=spec,
        classes=DEMO_CLASSES,
        ignore_index=255,
        input=InputSpec([1, 2, 3], "uint8", 1 / 255, [0.45] * 3, [0.25] * 3, resolution=0.5),
        window=window,
        state_dict=create_model_from_spec(spec).state_dict(),
    )
    save_checkpoint(ckpt, path)


def backbone_rate(engine: TorchEngine, window: int, rounds: int) -> tuple[float, float]:
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


def head_share(engine: TorchEngine, window: int, rounds: int) -> tuple[float, float]:
    """(seconds per window for the whole network at batch 1, seconds per window for the head
    and output alone at 16 windows per pass): what the window engine and the shared engine
    each spend on one window and view besides reading and blending. Their ratio caps the
    shared engine's speed-up whatever its backbone costs."""
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, window, window), dtype=np.float32)
    features = engine.features(rng.random((16, 3, window, window), dtype=np.float32))

    def best(fn: object, *args: np.ndarray) -> float:
        fn(*args)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(engine.predict, image), best(engine.head_probabilities, features) / 16


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
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "geoseg-eng")
    parser.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    args.data.mkdir(parents=True, exist_ok=True)
    raster = args.data / f"scene_{args.size}.tif"
    if not raster.exists():
        write_scene(raster, args.size)
    ckpt = args.data / f"{args.variant}-{args.backbone}-{args.window}.pt"
    if not ckpt.exists():
        write_checkpoint(ckpt, args.variant, args.backbone, args.window)
    torch_engine = TorchEngine(ckpt, args.device)
    per_pixel, rate = backbone_rate(torch_engine, args.window, args.rounds)
    engine = torch_engine
    if args.runtime == "onnx":
        model = ckpt.with_suffix(".onnx")
        if not model.exists():  # an untrained resnet50 needs a looser float32 tolerance
            export_onnx(ckpt, model, tolerance=0.05)
        engine = OnnxEngine(model, args.device, threads=args.threads)
    pixels = args.size**2
    bound = pixels * per_pixel / rate
    whole, head = head_share(torch_engine, args.window, args.rounds)
    print(
        f"per window and view: whole network {1e3 * whole:.1f} ms (batch 1), head and output "
        f"{1e3 * head:.1f} ms (16 per pass): the shared engine cannot beat the window engine "
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
        reference = None
        for name, batch in runs:
            out = args.data / f"pred_{name}_{stride}_{tta}.tif"
            options = PredictOptions(
                window=args.window, stride=int(stride), tta=tta, batch_size=batch,
                engine=name, overwrite=True, **extra,
            )  # fmt: skip
            start = time.perf_counter()
            result = predict_raster(engine, raster, out, options)
            seconds = time.perf_counter() - start
            with rasterio.open(out) as ds:
                classes, tags = ds.read(1), ds.tags()
            if reference is None:
                reference = (seconds, classes)
            valid = reference[1] != 255
            agreement = (classes[valid] == reference[1][valid]).mean()
            label = f"{name} (batch {batch or 'default'})"
            print(f"{config} {label}: {seconds:.1f} s, {result.windows} windows", file=sys.stderr)
            rows.append([config, label, tags["STRIDE"], f"{seconds:.1f}",
                         f"{pixels / seconds / 1e6:.3f}", f"{reference[0] / seconds:.2f}x",
                         f"{seconds / bound:.2f}", f"{100 * agreement:.2f}%"])  # fmt: skip

    header = ["stride:TTA", "engine", "stride used", "seconds", "Mpx/s", "speed-up",
              "x one-pass bound", "classes as first row"]  # fmt: skip
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in (header, *rows):
            print("  ".join(v.rjust(n) for v, n in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
