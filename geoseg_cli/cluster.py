"""Unsupervised segmentation of one scene (``geoseg cluster``): SGSeg trained on the scene's
own windows, then streamed over the whole raster as ``geoseg predict`` streams.

1. **sample**: up to ``train_windows`` windows are drawn at random from the grid of
   windows (stride T/2, reflect-padded past the edges) that hold enough valid pixels, and
   kept in memory (bounded by that count, not by the raster); their valid pixels give the
   per-band mean and standard deviation;
2. **train**: the cluster classifier of :class:`models.sgseg.SGSegNet` starts as the
   nearest-centre rule of a k-means of the untrained network's pixel embeddings (every
   cluster starts with pixels); the network then learns, without labels, to give the same
   cluster to a pixel in two augmented views of its window (a photometric jitter; a
   dihedral turn or flip plus another jitter). The loss is minus the mutual information of
   the two views' cluster assignments (IIC), with its pull towards equal cluster sizes
   replaced by a pull towards the k-means proportions
   (:func:`models.sgseg.mutual_information` with a prior), plus the superpixel
   reconstruction error, all over valid pixels only;
3. **predict**: the trained network runs through :func:`geoseg_cli.predict.predict_raster`
   as an engine (row bands of windows, blended soft cluster probabilities, memory
   independent of the raster height, nodata kept as 255, the input's grid, a colour table
   and tags), and ``--classes-out`` writes a classes file naming the clusters.

Everything random (window draw, initial weights, augmentations, batch order) follows the
seed, so a run is repeatable on the same machine (bit for bit on a CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geoseg_cli.checkpoint import ClassInfo, InputSpec, ModelInfo, ModelSpec
from geoseg_cli.engine import InferenceModel, resolve_device
from geoseg_cli.errors import GeosegError, InputError, UsageError
from geoseg_cli.labels import default_color
from geoseg_cli.predict import (
    WINDOW_MULTIPLE,
    PredictOptions,
    check_outputs,
    class_dtype,
    predict_raster,
)
from geoseg_cli.progress import progress
from geoseg_cli.raster import (
    atomic_output,
    check_output,
    data_bands,
    nodata_valid,
    open_raster,
    read_masked,
)
from geoseg_cli.tiling import default_scale
from geoseg_cli.windows import reflect_indices, window_starts
from models.sgseg import SGSegNet, cell_size, mutual_information

log = logging.getLogger(__name__)

#: Suffix of the default output name: ``scene.tif`` → ``scene_clusters.tif``.
OUTPUT_SUFFIX = "_clusters"
#: Classes-file formats ``--classes-out`` writes, by suffix.
CLASSES_SUFFIXES = (".toml", ".json")
#: Windows with a smaller share of valid pixels are drawn for training only when the raster
#: has no better ones.
MIN_VALID_FRACTION = 0.5
#: Pixel embeddings sampled for the k-means that starts the cluster classifier.
INIT_PIXELS = 20_000
#: Smallest target share of a cluster, times 1/K (a cluster k-means left nearly empty may
#: still grow).
MIN_PRIOR = 0.1
#: Per-band gain (1 ± this) and offset (± this, in standard deviations) of the photometric
#: jitter, and the standard deviation of the added noise.
JITTER = 0.1
NOISE = 0.05


@dataclass
class ClusterOptions:
    """How to cluster one raster (the flags of ``geoseg cluster``).

    Attributes:
        clusters: Number of clusters K (2..255: ids 0..K-1, nodata 255).
        superpixels: Superpixels per window (a regular grid of about that many seeds).
        epochs: Passes over the training windows.
        window: Window size T in pixels, a multiple of 16, for training and prediction.
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
    """Display colours of clusters 0..count-1: geoseg's class palette without its first
    entry (black, which reads as nodata in a GIS)."""
    return [default_color(i + 1) for i in range(count)]


def cluster_classes(count: int) -> list[ClassInfo]:
    """The clusters as classes: ``cluster_0`` ... with :func:`cluster_colors`."""
    return [ClassInfo(f"cluster_{i}", c) for i, c in enumerate(cluster_colors(count))]


def default_output(source: str | os.PathLike) -> Path:
    """``<stem>_clusters.tif`` in the current folder."""
    stem = Path(str(source).split("?")[0]).stem
    return Path.cwd() / f"{stem}{OUTPUT_SUFFIX}.tif"


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
    check_outputs(output, predict_options, [source])
    if options.classes_out is not None:
        _check_classes_out(Path(options.classes_out), output, options.overwrite)
    with open_raster(source) as src:
        bands = _select_bands(src, options.bands)
        dtype = src.dtypes[bands[0] - 1]
        scale = default_scale(dtype)
        images, valid = _sample_windows(src, bands, options)
    mean, std = _band_stats(images, valid, scale)
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
    model, loss, mi = _train(images * np.float32(scale), valid, mean, std, options, device)
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
            bands=list(bands),
            dtype=dtype,
            scale=scale,
            mean=mean,
            std=std,
            nodata=options.nodata,
        ),
        window=options.window,
    )
    engine = ClusterEngine(model, info, device)
    predict_options = dataclasses.replace(predict_options, bands=bands)
    result = predict_raster(engine, source, output, predict_options)
    if options.classes_out is not None:
        write_classes_file(options.classes_out, info.classes, info.ignore_index, options.overwrite)
    return ClusterResult(
        output=output,
        classes_out=Path(options.classes_out) if options.classes_out is not None else None,
        clusters=options.clusters,
        train_windows=len(images),
        epochs=options.epochs,
        loss=loss,
        mutual_information=mi,
        windows=result.windows,
        skipped=result.skipped,
    )


class ClusterEngine:
    """A trained :class:`models.sgseg.SGSegNet` as a predict engine: scaled windows in,
    standardized inside (:class:`~geoseg_cli.engine.InferenceModel`), soft cluster
    probabilities out.

    Attributes:
        info: Clusters as classes, input scaling and window.
        model_hash: First 16 hex digits of the SHA-256 of the weights.
        device: Where the network runs.
    """

    def __init__(self, model: SGSegNet, info: ModelInfo, device: torch.device) -> None:
        self.info = info
        self.device = device
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


def write_classes_file(
    path: str | os.PathLike,
    classes: list[ClassInfo],
    ignore_index: int,
    overwrite: bool = False,
) -> Path:
    """Write a classes file (TOML for ``.toml``, JSON for ``.json``) in the layout that
    :func:`geoseg_cli.labels.load_classes` reads: class ``i`` is label value ``i``.

    Returns:
        The file written.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        doc = {
            "ignore_index": ignore_index,
            "classes": [{"name": c.name, "color": list(c.color)} for c in classes],
        }
        text = json.dumps(doc, indent=2) + "\n"
    else:
        lines = [
            "# Classes of a geoseg cluster map: rename the clusters (names must stay unique),",
            "# then use this file with geoseg tile --classes or geoseg evaluate --classes.",
            f"ignore_index = {ignore_index}",
        ]
        for c in classes:
            lines += ["", "[[classes]]", f"name = {json.dumps(c.name)}", f"color = {list(c.color)}"]
        text = "\n".join(lines) + "\n"
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _check_options(options: ClusterOptions) -> PredictOptions:
    """Refuse inconsistent options; the prediction options they imply."""
    t = options.window
    if t < 2 * WINDOW_MULTIPLE or t % WINDOW_MULTIPLE:
        raise UsageError(f"--window {t} must be a multiple of {WINDOW_MULTIPLE}, at least 32")
    if not 2 <= options.clusters <= 255:
        raise UsageError(f"-k {options.clusters} must be between 2 and 255 clusters")
    cells = (t // 2) ** 2 // 4  # seed cells of at least 2×2 working pixels
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
        stride=options.stride,
        batch_size=options.batch_size,
        nodata=options.nodata,
        creation_options=options.creation_options,
        overwrite=options.overwrite,
    )


def _check_classes_out(path: Path, output: Path, overwrite: bool) -> None:
    if path.suffix.lower() not in CLASSES_SUFFIXES:
        raise UsageError(f"--classes-out {path}: name the classes file .toml or .json")
    if path.resolve() == output.resolve():
        raise UsageError(f"--classes-out {path} is the cluster map; give another name")
    check_output(path, overwrite)


def _select_bands(src: rasterio.DatasetReader, bands: tuple[int, ...] | None) -> tuple[int, ...]:
    """The bands to read: ``-b``, else every band but alpha bands."""
    chosen = tuple(bands) if bands else tuple(data_bands(src))
    if max(chosen) > src.count:
        raise InputError(f"{src.name} has {src.count} band(s); -b {max(chosen)} does not exist")
    return chosen


def _read_window(
    src: rasterio.DatasetReader,
    bands: tuple[int, ...],
    row: int,
    col: int,
    size: int,
    nodata: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw bands (C×T×T float32) and valid mask (T×T) of a window that may reach past the
    raster, reflect-padded there as predict pads its windows."""
    rows = reflect_indices(row, row + size, src.height)
    cols = reflect_indices(col, col + size, src.width)
    r0, c0 = int(rows.min()), int(cols.min())
    window = Window(c0, r0, int(cols.max()) + 1 - c0, int(rows.max()) + 1 - r0)
    if nodata is None:
        data, valid = read_masked(src, window, list(bands))
    else:
        data = src.read(list(bands), window=window)
        valid = nodata_valid(data, nodata)
    pick = np.ix_(rows - r0, cols - c0)
    return data[:, pick[0], pick[1]].astype(np.float32), valid[pick]


def _sample_windows(
    src: rasterio.DatasetReader, bands: tuple[int, ...], options: ClusterOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the training windows: grid windows (stride T/2) in a random order, those with
    at least :data:`MIN_VALID_FRACTION` valid pixels first.

    Returns:
        Raw bands N×C×T×T float32 and valid masks N×T×T bool.

    Raises:
        InputError: Every pixel is nodata.
    """
    t = options.window
    rows = window_starts(src.height, t, t // 2)
    cols = window_starts(src.width, t, t // 2)
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(rows) * len(cols))
    good: list[tuple[np.ndarray, np.ndarray]] = []
    partial: list[tuple[np.ndarray, np.ndarray]] = []
    for index in progress(order, desc="sampling windows", unit="win"):
        r, c = divmod(int(index), len(cols))
        data, valid = _read_window(src, bands, int(rows[r]), int(cols[c]), t, options.nodata)
        fraction = float(valid.mean())
        if fraction >= MIN_VALID_FRACTION:
            good.append((data, valid))
            if len(good) == options.train_windows:
                break
        elif fraction > 0 and len(partial) < options.train_windows:
            partial.append((data, valid))
    chosen = (good + partial)[: options.train_windows]
    if not chosen:
        raise InputError(f"{src.name}: every pixel is nodata; check --nodata or -b")
    return np.stack([d for d, _ in chosen]), np.stack([v for _, v in chosen])


def _band_stats(images: np.ndarray, valid: np.ndarray, scale: float) -> tuple[list, list]:
    """Per-band mean and standard deviation of the scaled valid pixels."""
    pixels = images.transpose(1, 0, 2, 3)[:, valid].astype(np.float64) * scale
    mean, std = pixels.mean(axis=1), pixels.std(axis=1)
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Flip left-right if ``flip``, then ``k`` quarter turns (as :class:`geoseg_cli.tta.View`)."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1))


def _undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def _jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-window, per-band gain and offset, plus pixel noise (standardized units)."""
    b, c = x.shape[:2]
    gain = 1 + JITTER * (2 * torch.rand(b, c, 1, 1, generator=generator) - 1)
    offset = JITTER * (2 * torch.rand(b, c, 1, 1, generator=generator) - 1)
    noise = NOISE * torch.randn(x.shape, generator=generator)
    return x * gain.to(x.device) + offset.to(x.device) + noise.to(x.device)


def kmeans(
    x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """k-means (Lloyd's iterations from k-means++ seeds) of the rows of ``x``.

    Returns:
        (k×d centres, the cluster of each row).
    """
    x = np.asarray(x, dtype=np.float64)
    centres = x[[int(rng.integers(len(x)))]]
    nearest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        pick = rng.choice(len(x), p=nearest / nearest.sum()) if nearest.sum() > 0 else 0
        centres = np.vstack([centres, x[pick]])
        nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    for _ in range(iterations):
        distances = (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None]
        labels = distances.argmin(1)
        moved = np.array(
            [x[labels == i].mean(0) if (labels == i).any() else centres[i] for i in range(k)]
        )
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres, labels


def _init_clusters(
    model: SGSegNet,
    standardized: torch.Tensor,
    masks: torch.Tensor,
    options: ClusterOptions,
    device: torch.device,
) -> torch.Tensor | None:
    """Start the classifier from k-means of the untrained network's pixel embeddings
    (:meth:`models.sgseg.SGSegNet.init_clusters`), so that every cluster starts with a
    share of the pixels and mutual-information training refines a partition rather than
    breaking the symmetry of uniform outputs, where clusters die early.

    Returns:
        The k-means cluster proportions (each at least :data:`MIN_PRIOR` / K), the
        target cluster sizes of :func:`models.sgseg.mutual_information`; None when the
        first batch holds fewer valid pixels than clusters (no start, equal sizes).
    """
    rng = np.random.default_rng(options.seed + 2)
    with torch.no_grad():
        batch = standardized[: options.batch_size].to(device)
        embedding = model.embeddings(batch)
        coarse = torch.nn.functional.avg_pool2d(masks[: len(batch), None].float(), 2)[:, 0] == 1
        pixels = embedding.permute(0, 2, 3, 1)[coarse.to(device)].cpu().numpy()
    if len(pixels) < options.clusters:
        return None
    sample = pixels[rng.choice(len(pixels), min(len(pixels), INIT_PIXELS), replace=False)]
    centres, labels = kmeans(sample, options.clusters, rng)
    spread = float(((sample - centres[labels]) ** 2).sum(1).mean())
    model.init_clusters(torch.from_numpy(centres).float().to(device), 1 / max(spread, 1e-6))
    shares = np.bincount(labels, minlength=options.clusters) / len(labels)
    shares = np.maximum(shares, MIN_PRIOR / options.clusters)
    return torch.from_numpy(shares / shares.sum()).float().to(device)


def _train(
    scaled: np.ndarray,
    valid: np.ndarray,
    mean: list[float],
    std: list[float],
    options: ClusterOptions,
    device: torch.device,
) -> tuple[SGSegNet, float, float]:
    """Train the network on the windows; returns it (eval mode, on ``device``) with the
    last epoch's mean loss and mutual information.

    Raises:
        GeosegError: The loss became NaN or infinite.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model = SGSegNet(
            scaled.shape[1], options.clusters, cell_size(options.window, options.superpixels)
        )
    model.to(device).train()
    generator = torch.Generator().manual_seed(options.seed)
    order_rng = np.random.default_rng(options.seed + 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    standardized = (torch.from_numpy(scaled) - mean_t) / std_t
    masks = torch.from_numpy(valid)
    n = len(standardized)
    prior = _init_clusters(model, standardized, masks, options, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    loss_value = mi_value = float("nan")
    bar = progress(total=options.epochs * -(-n // options.batch_size), desc="training", unit="step")
    with bar:
        for epoch in range(options.epochs):
            losses, infos = [], []
            order = torch.from_numpy(order_rng.permutation(n))
            for start in range(0, n, options.batch_size):
                index = order[start : start + options.batch_size]
                x, mask = standardized[index], masks[index].to(device)
                k = int(torch.randint(4, (1,), generator=generator))
                flip = bool(torch.randint(2, (1,), generator=generator))
                first = model(_jitter(x, generator).to(device))
                second = model(_dihedral(_jitter(x, generator), k, flip).to(device))
                p1 = torch.softmax(first.logits, dim=1)
                p2 = _undo_dihedral(torch.softmax(second.logits, dim=1), k, flip)
                objective, mi = mutual_information(p1, p2, mask, prior)
                coarse = torch.nn.functional.avg_pool2d(mask[:, None].float(), 2)[:, 0] == 1
                sp_mask = torch.stack([coarse, _dihedral(coarse, k, flip)])
                errors = torch.stack([first.superpixel_error, second.superpixel_error])
                sp = (errors * sp_mask).sum() / sp_mask.sum().clamp_min(1)
                loss = -objective + options.superpixel_weight * sp
                if not math.isfinite(loss.item()):
                    raise GeosegError(
                        f"the clustering loss became {loss.item()} in epoch {epoch + 1}; "
                        "lower --lr or check the input for extreme values"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                infos.append(mi.item())
                bar.update(1)
            loss_value, mi_value = float(np.mean(losses)), float(np.mean(infos))
            log.info(
                "epoch %d/%d: loss %.4f, mutual information %.4f (max %.4f)",
                epoch + 1,
                options.epochs,
                loss_value,
                mi_value,
                math.log(options.clusters),
            )
    return model.eval(), loss_value, mi_value
