"""Unsupervised segmentation of one scene (``geoseg cluster``), streamed as predict streams.

1. **sample**: up to ``train_windows`` windows are drawn at random from the scene
   (:func:`geoseg_cli.cluster_train.sample_windows`) and kept in memory, bounded by that
   count, not by the raster;
2. **train**: :class:`models.sgseg.SGSegNet` learns without labels to give a pixel the same
   cluster in two augmented views of its window
   (:func:`geoseg_cli.cluster_train.train_clusters`);
3. **predict**: the trained network runs as a
   :class:`~geoseg_cli.inference.runtime.Runtime` through
   :func:`geoseg_cli.inference.predict_raster` (row bands of windows, blended soft cluster
   probabilities, memory independent of the raster height, nodata kept as 255, the input's
   grid, a colour table and tags), and ``--classes-out`` writes a classes file naming the
   clusters.

Everything random (window draw, initial weights, augmentations, batch order) follows the
seed, so a run is repeatable on the same machine (bit for bit on a CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from geoseg_cli.checkpoint import InputSpec, ModelInfo, ModelSpec
from geoseg_cli.classes import ClassInfo, ClassTable, default_color, write_classes_file
from geoseg_cli.cluster_train import band_stats, sample_windows, select_bands, train_clusters
from geoseg_cli.distributed import resolve_device
from geoseg_cli.errors import UsageError
from geoseg_cli.inference import PredictOptions, predict_raster
from geoseg_cli.inference.outputs import check_outputs, class_dtype
from geoseg_cli.inference.plan import check_window
from geoseg_cli.raster import check_output, open_raster
from geoseg_cli.tiling import default_scale
from models import InferenceModel
from models.sgseg import STRIDE, SGSegNet

log = logging.getLogger(__name__)

#: Suffix of the default output name: ``scene.tif`` → ``scene_clusters.tif``.
OUTPUT_SUFFIX = "_clusters"
#: Classes-file formats ``--classes-out`` writes, by suffix.
CLASSES_SUFFIXES = (".toml", ".json")
#: Smallest window side: room for 4 superpixels of 2×2 working pixels at least.
MIN_WINDOW = 32
#: Header of a ``--classes-out`` TOML file.
CLASSES_COMMENT = (
    "Classes of a geoseg cluster map: rename the clusters (names must stay unique),",
    "then use this file with geoseg tile --classes or geoseg evaluate --classes.",
)


@dataclass
class ClusterOptions:
    """How to cluster one raster (the flags of ``geoseg cluster``).

    Attributes:
        clusters: Number of clusters K (2..255: ids 0..K-1, nodata 255).
        superpixels: Superpixels per window (a regular grid of about that many seeds).
        epochs: Passes over the training windows.
        window: Window size T in pixels, even, for training and prediction.
        stride: Prediction stride (default T // 2).
        batch_size: Windows per training step and per prediction pass.
        train_windows: Windows drawn from the scene for training (bounds the memory).
        lr: Adam learning rate.
        seed: Seed of everything random.
        superpixel_weight: Weight of the superpixel reconstruction loss against the mutual
            information.
        bands: 1-based bands to read (default: every band but alpha bands).
        nodata: Input nodata value overriding the raster's masks.
        device: ``auto``, ``cpu`` or ``cuda``.
        creation_options: GDAL creation options of the output.
        overwrite: Replace existing outputs.
        classes_out: Also write a classes file (``.toml`` or ``.json``) naming the clusters.
    """

    clusters: int = 6
    superpixels: int = 100
    epochs: int = 10
    window: int = 128
    stride: int | None = None
    batch_size: int = 8
    train_windows: int = 128
    lr: float = 1e-2
    seed: int = 0
    superpixel_weight: float = 0.1
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    device: str = "auto"
    creation_options: dict[str, str] = field(default_factory=dict)
    overwrite: bool = False
    classes_out: Path | None = None


@dataclass(frozen=True)
class ClusterResult:
    """What :func:`cluster_raster` did.

    Attributes:
        output: The cluster map.
        classes_out: The classes file, if asked for.
        clusters: Number of clusters.
        train_windows: Windows trained on.
        epochs: Epochs trained.
        loss: Mean loss of the last epoch.
        mutual_information: Mean mutual information of the last epoch (nats; at most
            ln K).
        windows: Windows predicted.
        skipped: Nodata-only windows skipped when predicting.
    """

    output: Path
    classes_out: Path | None
    clusters: int
    train_windows: int
    epochs: int
    loss: float
    mutual_information: float
    windows: int
    skipped: int


def cluster_colors(count: int) -> list[tuple[int, int, int]]:
    """Display colours of clusters 0..count-1: the class palette without its black."""
    return [default_color(i + 1) for i in range(count)]


def cluster_classes(count: int) -> list[ClassInfo]:
    """The clusters as classes: ``cluster_0`` ... with :func:`cluster_colors`."""
    return [ClassInfo(f"cluster_{i}", c) for i, c in enumerate(cluster_colors(count))]


def default_output(source: str | os.PathLike) -> Path:
    """``<stem>_clusters.tif`` in the current folder."""
    stem = Path(str(source).split("?")[0]).stem
    return Path.cwd() / f"{stem}{OUTPUT_SUFFIX}.tif"


class ClusterRuntime:
    """A trained :class:`models.sgseg.SGSegNet` as a predict runtime, whole windows only.

    Scaled windows in, standardized inside (:class:`models.InferenceModel`), soft cluster
    probabilities out: a :class:`~geoseg_cli.inference.runtime.Runtime` without the
    backbone/head split and without feature streams.

    Attributes:
        info: Clusters as classes, input scaling and window.
        model_hash: First 16 hex digits of the SHA-256 of the weights.
        on_gpu: Whether the network runs on CUDA.
        device: Where the network runs.
    """

    output_stride = STRIDE
    feature_channels = None
    streams = False

    def __init__(self, model: SGSegNet, info: ModelInfo, device: torch.device) -> None:
        self.info = info
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.module = InferenceModel(model, info.input.mean, info.input.std).to(device).eval()
        digest = hashlib.sha256()
        for name, tensor in sorted(self.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.model_hash = digest.hexdigest()[:16]

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Cluster probabilities (N×K×H×W float32) of scaled windows (N×C×H×W float32)."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return self.module(x).float().cpu().numpy()


def cluster_raster(
    source: str | os.PathLike, output: str | os.PathLike, options: ClusterOptions | None = None
) -> ClusterResult:
    """Cluster one raster without labels and write the cluster map (and a classes file).

    Args:
        source: Input raster (anything ``rasterio.open`` accepts).
        output: Cluster-map GeoTIFF to write (uint8 ids 0..K-1, nodata 255).
        options: Clustering options.

    Returns:
        What was trained and written.

    Raises:
        GeosegError: Bad options, unreadable or all-nodata input, an output that exists
            (without ``overwrite``), or a loss that became NaN; nothing is left under the
            final names.
    """
    options = options or ClusterOptions()
    output = Path(output)
    predict_options = _check_options(options)
    check_outputs(output, False, None, False, options.creation_options, options.overwrite, [source])
    if options.classes_out is not None:
        _check_classes_out(Path(options.classes_out), output, options.overwrite)
    with open_raster(source) as src:
        bands = select_bands(src, options.bands)
        dtype = src.dtypes[bands[0] - 1]
        scale = default_scale(dtype)
        images, valid = sample_windows(src, bands, options)
    mean, std = band_stats(images, valid, scale)
    log.info(
        "%s: training on %d windows of %d px for %d epochs (%d clusters, about %d "
        "superpixels per window)",
        source,
        len(images),
        options.window,
        options.epochs,
        options.clusters,
        options.superpixels,
    )
    device = resolve_device(options.device)
    model, loss, mi = train_clusters(images * np.float32(scale), valid, mean, std, options, device)
    info = ModelInfo(
        model=ModelSpec(
            variant="sgseg",
            backbone="cnn",
            num_classes=options.clusters,
            in_channels=len(bands),
            options={"superpixels": options.superpixels, "cell": model.cell},
        ),
        classes=cluster_classes(options.clusters),
        ignore_index=class_dtype(options.clusters)[1],
        input=InputSpec(
            bands=list(bands), dtype=dtype, scale=scale, mean=mean, std=std, nodata=options.nodata
        ),
        window=options.window,
    )
    runtime = ClusterRuntime(model, info, device)
    predict_options = dataclasses.replace(predict_options, bands=bands)
    result = predict_raster(runtime, source, output, predict_options)
    classes_out = None
    if options.classes_out is not None:
        table = ClassTable(info.classes, ignore_index=info.ignore_index)
        classes_out = write_classes_file(
            options.classes_out, table, CLASSES_COMMENT, options.overwrite
        )
    return ClusterResult(
        output=output,
        classes_out=classes_out,
        clusters=options.clusters,
        train_windows=len(images),
        epochs=options.epochs,
        loss=loss,
        mutual_information=mi,
        windows=result.windows,
        skipped=result.skipped,
    )


def _check_options(options: ClusterOptions) -> PredictOptions:
    """Refuse inconsistent options; the prediction options they imply."""
    t = options.window
    stride = options.stride or t // 2
    check_window(t, stride, STRIDE)
    if t < MIN_WINDOW:
        raise UsageError(f"--window {t} must be at least {MIN_WINDOW}")
    if not 2 <= options.clusters <= 255:
        raise UsageError(f"-k {options.clusters} must be between 2 and 255 clusters")
    cells = (t // STRIDE) ** 2 // 4  # seed cells of at least 2×2 working pixels
    if not 4 <= options.superpixels <= cells:
        raise UsageError(
            f"--superpixels {options.superpixels} must be between 4 and {cells} for --window {t}"
        )
    for name, value in (
        ("--epochs", options.epochs),
        ("--batch-size", options.batch_size),
        ("--train-windows", options.train_windows),
    ):
        if value < 1:
            raise UsageError(f"{name} {value} must be at least 1")
    if not options.lr > 0:
        raise UsageError(f"--lr {options.lr} must be positive")
    if options.seed < 0:
        raise UsageError(f"--seed {options.seed} must be at least 0")
    return PredictOptions(
        window=t,
        stride=stride,
        batch_size=options.batch_size,
        nodata=options.nodata,
        creation_options=options.creation_options,
        overwrite=options.overwrite,
    )


def _check_classes_out(path: Path, output: Path, overwrite: bool) -> None:
    """Refuse a classes file that is not TOML or JSON, is the map, or exists."""
    if path.suffix.lower() not in CLASSES_SUFFIXES:
        raise UsageError(f"--classes-out {path}: name the classes file .toml or .json")
    if path.resolve() == output.resolve():
        raise UsageError(f"--classes-out {path} is the cluster map; give another name")
    check_output(path, overwrite)
