"""Training of ``geoseg cluster``: window sampling, augmentations, k-means start, IIC loop.

The cluster classifier of :class:`models.sgseg.SGSegNet` starts as the nearest-centre rule
of a k-means of the untrained network's pixel embeddings (every cluster starts with
pixels); the network then learns, without labels, to give the same cluster to a pixel in
two augmented views of its window (a photometric jitter; a dihedral turn or flip plus
another jitter). The loss is minus the mutual information of the two views' cluster
assignments (IIC), with its pull towards equal cluster sizes replaced by a pull towards the
k-means proportions (:func:`models.sgseg.mutual_information` with a prior), plus the
superpixel reconstruction error, all over valid pixels only.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geoseg_cli.errors import GeosegError, InputError
from geoseg_cli.inference.windows import reflect_indices, window_starts
from geoseg_cli.progress import progress
from geoseg_cli.raster import data_bands, nodata_valid, read_masked
from models import Dihedral
from models.sgseg import SGSegNet, cell_size, mutual_information

if TYPE_CHECKING:
    from geoseg_cli.cluster import ClusterOptions

log = logging.getLogger(__name__)

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


def select_bands(src: rasterio.DatasetReader, bands: tuple[int, ...] | None) -> tuple[int, ...]:
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
    """Raw bands (C×T×T float32) and valid mask (T×T) of a window, reflect-padded.

    The window may reach past the raster: it is reflect-padded there as predict pads.
    """
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


def sample_windows(
    src: rasterio.DatasetReader, bands: tuple[int, ...], options: ClusterOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the training windows from the grid of windows at stride T/2, in a random order.

    Windows with at least :data:`MIN_VALID_FRACTION` valid pixels come first.

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


def band_stats(images: np.ndarray, valid: np.ndarray, scale: float) -> tuple[list, list]:
    """Per-band mean and standard deviation of the scaled valid pixels."""
    pixels = images.transpose(1, 0, 2, 3)[:, valid].astype(np.float64) * scale
    mean, std = pixels.mean(axis=1), pixels.std(axis=1)
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


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
    """Start the classifier from k-means of the untrained network's pixel embeddings.

    Through :meth:`models.sgseg.SGSegNet.init_clusters` every cluster starts with a share
    of the pixels, so that mutual-information training refines a partition rather than
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


def train_clusters(
    scaled: np.ndarray,
    valid: np.ndarray,
    mean: list[float],
    std: list[float],
    options: ClusterOptions,
    device: torch.device,
) -> tuple[SGSegNet, float, float]:
    """Train the network on the windows.

    Returns:
        The network (eval mode, on ``device``), the last epoch's mean loss and mutual
        information.

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
                view = Dihedral(
                    int(torch.randint(4, (1,), generator=generator)),
                    bool(torch.randint(2, (1,), generator=generator)),
                )
                first = model(_jitter(x, generator).to(device))
                second = model(view.apply(_jitter(x, generator)).to(device))
                p1 = torch.softmax(first.logits, dim=1)
                p2 = view.invert(torch.softmax(second.logits, dim=1))
                objective, mi = mutual_information(p1, p2, mask, prior)
                coarse = torch.nn.functional.avg_pool2d(mask[:, None].float(), 2)[:, 0] == 1
                sp_mask = torch.stack([coarse, view.apply(coarse)])
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
