"""ONNX Runtime vs PyTorch eager on CPU, measured in one run (DESIGN.md §7, §11).

* one-window latency (batch 1, T×T): PyTorch eager, ONNX Runtime fp32 (as ``geoseg
  predict`` runs it), ONNX Runtime int8, and the ONNX Runtime settings that matter
  (graph optimisation level, thread count, fixed vs dynamic input size);
* full-raster throughput (Mpx/s) of ``geoseg predict``'s pipeline with each engine on a
  synthetic orthophoto-like scene (``geoseg demo``'s generator), and how many pixels the
  class maps of ONNX fp32 and int8 share with PyTorch's.

Latencies are interleaved (one call of each configuration per round, median over rounds),
so background load affects every configuration alike.

Usage::

    python benchmarks/onnx_vs_torch.py                                  # scg-gcn resnet50, T=448
    python benchmarks/onnx_vs_torch.py --backbone resnet18 --window 256 --size 2048
    python benchmarks/onnx_vs_torch.py --checkpoint run/best.pt --markdown

Without ``--checkpoint`` the model is untrained; its BatchNorm statistics are re-estimated on
windows of the scene so activations have a trained network's range (class agreement of an
untrained model is still only indicative).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import onnxruntime as ort
import rasterio
import torch
from common import write_checkpoint, write_scene

from geoseg_cli.allocator import keep_freed_memory
from geoseg_cli.export.onnx import export_onnx
from geoseg_cli.inference import PredictOptions, predict_raster
from geoseg_cli.inference.onnx_runtime import OnnxRuntime
from geoseg_cli.inference.torch_runtime import TorchRuntime


def session(path: Path, threads: int, level: str = "all") -> Callable[[np.ndarray], np.ndarray]:
    """A bare ONNX Runtime session with the given optimisation level and thread count."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"image": x})[0]


def latencies(
    configs: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray, rounds: int
) -> dict[str, float]:
    """Median seconds per call of each configuration, interleaved round by round."""
    for run in configs.values():
        run(x)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def throughput(engine, scene: Path, out: Path, window: int) -> tuple[float, np.ndarray]:
    """Seconds for ``geoseg predict``'s pipeline on ``scene`` with ``engine``, and the map."""
    start = time.perf_counter()
    predict_raster(engine, scene, out, PredictOptions(window=window, overwrite=True))
    elapsed = time.perf_counter() - start
    with rasterio.open(out) as src:
        return elapsed, src.read(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="A trained .pt (default: untrained)")
    parser.add_argument("--variant", default="scg-gcn")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--window", type=int, default=448)
    parser.add_argument("--size", type=int, default=1024, help="Scene size in pixels.")
    parser.add_argument("--rounds", type=int, default=7, help="Latency rounds.")
    parser.add_argument("--threads", type=int, default=2, help="Threads for both runtimes.")
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="fp32 parity tolerance for the export."
    )
    parser.add_argument("--markdown", action="store_true", help="Print markdown tables.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    keep_freed_memory()  # as the geoseg command does
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="geoseg-bench-onnx-") as work:
        run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    """Build (or take) the model, export it, measure, print the tables."""
    scene = work / "scene.tif"
    image = write_scene(scene, args.size, nodata=False)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = work / "model.pt"
        write_checkpoint(ckpt, args.variant, args.backbone, args.window, image)
    exports, export_seconds = {}, {}
    for name, kwargs in {
        "fp32": {},
        "int8": {"precision": "int8"},
        "fp32-dynamic": {"dynamic_size": True},
    }.items():
        start = time.perf_counter()
        exports[name] = export_onnx(ckpt, work / f"{name}.onnx", tolerance=args.tolerance, **kwargs)
        export_seconds[name] = time.perf_counter() - start
    window = exports["fp32"].window

    torch_engine = TorchRuntime(ckpt, "cpu")
    onnx_engine = OnnxRuntime(exports["fp32"].path, "cpu", threads=args.threads)
    int8_engine = OnnxRuntime(exports["int8"].path, "cpu", threads=args.threads)
    x = np.random.default_rng(0).random((1, 3, window, window), dtype=np.float32)
    lat = latencies(
        {
            "PyTorch eager fp32": torch_engine.predict,
            "ONNX Runtime fp32 (geoseg predict)": onnx_engine.predict,
            "ONNX Runtime int8 (dynamic quantization)": int8_engine.predict,
            "ONNX Runtime fp32, basic graph optimisation": session(
                exports["fp32"].path, args.threads, "basic"
            ),
            "ONNX Runtime fp32, 1 thread": session(exports["fp32"].path, 1),
            "ONNX Runtime fp32, dynamic-size graph": session(
                exports["fp32-dynamic"].path, args.threads
            ),
        },
        x,
        args.rounds,
    )
    base = lat["PyTorch eager fp32"]

    runs = {}
    for name, engine in (
        ("PyTorch eager fp32", torch_engine),
        ("ONNX Runtime fp32", onnx_engine),
        ("ONNX Runtime int8", int8_engine),
    ):
        runs[name] = throughput(engine, scene, work / f"{name.split()[-1]}-{len(runs)}.tif", window)
    reference = runs["PyTorch eager fp32"][1]
    fp32_map = runs["ONNX Runtime fp32"][1]

    bar = "|" if args.markdown else " "
    model = f"{torch_engine.info.model.variant}/{torch_engine.info.model.backbone}"
    print(
        f"\nmodel {model}, window {window}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, {'trained' if args.checkpoint else 'untrained'}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"\n{bar} one window (1×3×{window}×{window}) {bar} median ms {bar} vs PyTorch {bar}")
    if args.markdown:
        print("|---|---|---|")
    for name, seconds in lat.items():
        print(f"{bar} {name} {bar} {1000 * seconds:.1f} {bar} {base / seconds:.2f}× {bar}")
    pixels = args.size * args.size
    print(
        f"\n{bar} {args.size}×{args.size} raster, stride {window // 2} {bar} seconds {bar} "
        f"Mpx/s {bar} vs PyTorch {bar} classes agree with PyTorch {bar} classes agree with "
        f"ONNX fp32 {bar}"
    )
    if args.markdown:
        print("|---|---|---|---|---|---|")
    torch_seconds = runs["PyTorch eager fp32"][0]
    for name, (seconds, class_map) in runs.items():
        print(
            f"{bar} {name} {bar} {seconds:.1f} {bar} {pixels / seconds / 1e6:.3f} {bar} "
            f"{torch_seconds / seconds:.2f}× {bar} {100 * (class_map == reference).mean():.3f}% "
            f"{bar} {100 * (class_map == fp32_map).mean():.3f}% {bar}"
        )
    print(
        f"\n{bar} export {bar} MB {bar} max abs diff vs PyTorch {bar} class agreement {bar} s {bar}"
    )
    if args.markdown:
        print("|---|---|---|---|---|")
    for name, result in exports.items():
        print(
            f"{bar} {name} {bar} {result.size_bytes / 1e6:.1f} {bar} {result.max_abs_diff:.2g} "
            f"{bar} {100 * result.class_agreement:.3f}% {bar} {export_seconds[name]:.0f} {bar}"
        )


if __name__ == "__main__":
    main()
