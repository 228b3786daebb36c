"""Loss terms for sparse labels: entropy of unlabelled predictions, Laplacian smoothness."""

from __future__ import annotations

import torch

#: Weight of the entropy term in ``--loss partial``.
ENTROPY_WEIGHT = 0.1
#: Weight of the smoothness term in ``--loss partial``.
SMOOTHNESS_WEIGHT = 0.1
#: Colour scale σ_c of the affinities, in standardized band units.
SIGMA_COLOR = 0.5
#: Position scale σ_xy of the pixel affinities, in pixels.
SIGMA_XY = 2.0
#: Pixel pairs up to this distance (pixels) enter the smoothness term.
SMOOTHNESS_RADIUS = 2


def entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along ``dim``, that dimension removed."""
    log_p = torch.log_softmax(logits.float(), dim=dim)
    return -(log_p.exp() * log_p).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (0 when it is nowhere true)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def affinity(
    color_sq: torch.Tensor, position_sq: torch.Tensor | float, sigma_color: float, sigma_xy: float
) -> torch.Tensor:
    """Gaussian affinity exp(−‖Δc‖²/2σ_c² − ‖Δx‖²/2σ_xy²) from squared distances."""
    return torch.exp(-color_sq / (2 * sigma_color**2) - position_sq / (2 * sigma_xy**2))


def pixel_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) of one half of the disc of ``radius`` (each pixel pair once)."""
    return [
        (dy, dx)
        for dy in range(radius + 1)
        for dx in range(-radius, radius + 1)
        if (dy > 0 or dx > 0) and dy * dy + dx * dx <= radius * radius
    ]


def grid_smoothness(
    probs: torch.Tensor,
    image: torch.Tensor,
    radius: int = SMOOTHNESS_RADIUS,
    sigma_color: float = SIGMA_COLOR,
    sigma_xy: float = SIGMA_XY,
) -> torch.Tensor:
    """Laplacian smoothness of per-pixel class probabilities over an image.

    Args:
        probs: B×K×H×W class probabilities.
        image: B×C×H×W colours (standardized bands); no gradient flows into it.
        radius: Pixel pairs up to this distance are compared.
        sigma_color: Colour scale of the affinities.
        sigma_xy: Position scale of the affinities, in pixels.

    Returns:
        Scalar Σ w_ij ‖p_i − p_j‖² / Σ w_ij over the batch.
    """
    image = image.detach().float()
    height, width = probs.shape[-2:]
    numerator = probs.new_zeros(())
    denominator = probs.new_zeros(())
    for dy, dx in pixel_offsets(radius):
        if dy >= height or abs(dx) >= width:
            continue
        first = (..., slice(0, height - dy), slice(max(-dx, 0), width - max(dx, 0)))
        second = (..., slice(dy, height), slice(max(dx, 0), width - max(-dx, 0)))
        color_sq = (image[first] - image[second]).pow(2).sum(1)
        weight = affinity(color_sq, float(dy * dy + dx * dx), sigma_color, sigma_xy)
        numerator = numerator + (weight * (probs[first] - probs[second]).pow(2).sum(1)).sum()
        denominator = denominator + weight.sum()
    return numerator / denominator.clamp(min=torch.finfo(denominator.dtype).tiny)


def unlabelled_terms(
    logits: torch.Tensor,
    target: torch.Tensor,
    image: torch.Tensor,
    ignore_index: int = 255,
    entropy_weight: float = ENTROPY_WEIGHT,
    smoothness_weight: float = SMOOTHNESS_WEIGHT,
) -> dict[str, torch.Tensor]:
    """The terms ``--loss partial`` adds to the cross-entropy on labelled pixels.

    With labels on a few pixels (points, scribbles), cross-entropy on the labelled pixels alone
    says nothing about the rest. Two terms speak for them, as in WSGCN (Pan et al., ICME 2021):

    - entropy: the mean Shannon entropy −Σ_k p_k log p_k of the predictions on unlabelled
      pixels, which asks for confident predictions there;
    - Laplacian smoothness: Σ_ij w_ij ‖p_i − p_j‖² / Σ_ij w_ij over pairs of nearby pixels (or
      graph edges), with Gaussian affinities w_ij = exp(−‖c_i − c_j‖²/2σ_c² − ‖x_i − x_j‖²/2σ_xy²)
      over colour c and position x, which asks pixels of one colour to share a class.
      (Σ_ij w_ij ‖p_i − p_j‖² = 2 tr(PᵀLP) for the graph Laplacian L of the affinities.)

    Args:
        logits: B×K×H×W class scores.
        target: B×H×W labels; ``ignore_index`` marks the unlabelled pixels.
        image: B×C×H×W network input (standardized bands) for the colour affinities.
        ignore_index: Label of unlabelled pixels.
        entropy_weight: Weight of the entropy term.
        smoothness_weight: Weight of the smoothness term.

    Returns:
        ``{"entropy": ..., "smooth": ...}``, weighted scalars.
    """
    logits = logits.float()
    return {
        "entropy": entropy_weight * masked_mean(entropy(logits), target == ignore_index),
        "smooth": smoothness_weight * grid_smoothness(torch.softmax(logits, 1), image),
    }
