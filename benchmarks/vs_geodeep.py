"""geoseg predict vs GeoDeep on the same exported model and raster, interleaved, best of N.

Every configuration is a command a user would run, each in a fresh process (imports,
sessions, reading, inference, writing all count). Rounds are interleaved and their order
rotates (A B C, then B C A, ...), so load from other jobs hits every configuration alike.
GeoDeep (``geodeep SCENE MODEL -t mask``: tile size from the graph, overlap from the model's
``tiles_overlap`` metadata, no blending) is installed with pip when missing; it is not a
geoseg dependency.

Configurations: ``geodeep``, ``window`` and ``shared`` (``geoseg predict -m MODEL.onnx``),
``int8-window`` and ``int8-shared`` (``-m`` the ``--int8`` model), ``torch-window`` and
``torch-shared`` (``-m`` the ``--checkpoint``). Agreement is the fraction of pixels with the
class the first configuration gives.

Usage::

    python benchmarks/vs_geodeep.py --model demo/model.onnx --int8 demo/model_int8.onnx \
        --checkpoint demo/run/best.pt --size 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from common import print_table, write_scene

BIN = Path(sys.executable).parent
CONFIGS = ("geodeep", "window", "shared", "int8-window", "int8-shared")


def ensure_geodeep() -> None:
    """Install GeoDeep into this environment unless it is importable."""
    if importlib.util.find_spec("geodeep") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "geodeep"], check=True)


def command(config: str, scene: Path, models: dict[str, Path], out: Path) -> list[str]:
    """The command line of one configuration, writing ``out``."""
    if config == "geodeep":
        geodeep = shutil.which("geodeep", path=str(BIN)) or "geodeep"
        return [geodeep, str(scene), str(models["fp32"]), "-t", "mask", "-q", "-o", str(out)]
    kind, _, engine = config.rpartition("-")
    model = models[kind or "fp32"]
    return [
        str(BIN / "geoseg"),
        "-q",
        "predict",
        str(scene),
        "-m",
        str(model),
        "--engine",
        engine,
        "-o",
        str(out),
        "--overwrite",
    ]


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``argv``; fails loudly."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{shlex.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def agreement(a: Path, b: Path) -> float:
    """Fraction of pixels of the same class in two class maps."""
    with rasterio.open(a) as ra, rasterio.open(b) as rb:
        return float((ra.read(1) == rb.read(1)).mean())


def main() -> None:
    """Run the comparison and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="fp32 .onnx (fixed size).")
    parser.add_argument("--int8", type=Path, help="The same model exported with --int8.")
    parser.add_argument("--checkpoint", type=Path, help="Its checkpoint (PyTorch rows).")
    parser.add_argument("--size", type=int, default=2048, help="Raster side in pixels.")
    parser.add_argument("--scenes", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", action="append", help=f"Any of {CONFIGS} + torch-*.")
    args = parser.parse_args()
    ensure_geodeep()
    scene = args.scenes / f"geoseg_bench_scene_{args.size}.tif"
    if not scene.exists():
        write_scene(scene, args.size, nodata=False)
    models = {"fp32": args.model, "int8": args.int8, "torch": args.checkpoint}
    configs = args.config or [
        c
        for c in (*CONFIGS, "torch-window", "torch-shared")
        if models[c.rpartition("-")[0] or "fp32"]
    ]
    walls: dict[str, list[float]] = {c: [] for c in configs}
    cpus: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {c: Path(tmp) / f"{c}.tif" for c in configs}
        for r in range(args.rounds):
            for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
                wall, cpu = timed(command(c, scene, models, outputs[c]))
                walls[c].append(wall)
                cpus[c].append(cpu)
                load = os.getloadavg()[0]
                print(
                    f"round {r + 1} {c}: {wall:.2f} s wall, {cpu:.2f} s CPU (load {load:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
        base_wall = min(walls.get("geodeep", [np.nan]))
        base_cpu = min(cpus.get("geodeep", [np.nan]))
        rows = []
        for c in configs:
            wall, cpu = min(walls[c]), min(cpus[c])
            rows.append(
                [
                    c,
                    f"{wall:.2f}",
                    " ".join(f"{w:.1f}" for w in walls[c]),
                    f"{args.size**2 / 1e6 / wall:.3f}",
                    f"{base_wall / wall:.2f}×",
                    f"{cpu:.2f}",
                    f"{base_cpu / cpu:.2f}×",
                    f"{100 * agreement(outputs[configs[0]], outputs[c]):.2f} %",
                ]
            )
    print(f"\n{args.size}² px, {args.model}, best of {args.rounds}, {os.cpu_count()} CPU(s)")
    header = [
        "configuration",
        "best wall s",
        "all wall s",
        "Mpx/s",
        "× GeoDeep (wall)",
        "best CPU s",
        "× GeoDeep (CPU)",
        f"classes as {configs[0]}",
    ]
    print_table(header, rows, markdown=True)


if __name__ == "__main__":
    main()
