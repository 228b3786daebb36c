"""Train/validation splits of the chips of ``geoseg tile``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from geoseg_cli.chips import ChipRecord

log = logging.getLogger(__name__)

#: Validation split rules: whole images (``source``) or single chips (``random``).
SPLITS = ("source", "random")


def assign_splits(
    chips: Sequence[ChipRecord],
    sources: Sequence[int],
    images: int,
    mode: str,
    val_fraction: float,
    seed: int,
) -> None:
    """Mark chips "val" or "train": whole images (``source``) or single chips (``random``).

    By image, images are visited in a seeded random order and each is taken for validation
    when that brings the validation chips nearer ``val_fraction`` of all chips (the
    smallest image when none does), never leaving training without chips; so images of very
    different sizes do not put most chips in validation.

    Args:
        chips: The chips, whose ``split`` is set.
        sources: Each chip's image index.
        images: Number of images.
        mode: One of :data:`SPLITS`.
        val_fraction: Share of validation chips.
        seed: Seed of the draw.
    """
    rng = np.random.default_rng([seed, 1])
    if mode == "source":
        per_source = np.bincount(sources, minlength=images)
        target, taken, val_sources = val_fraction * len(chips), 0, set()
        for source in rng.permutation(images).tolist():
            n = per_source[source]
            if taken + n < len(chips) and abs(taken + n - target) < abs(taken - target):
                val_sources.add(source)
                taken += n
        candidates = [i for i, n in enumerate(per_source) if 0 < n < len(chips)]
        if val_fraction > 0 and not val_sources and candidates:
            smallest = min(candidates, key=lambda i: per_source[i])
            val_sources, taken = {smallest}, per_source[smallest]
        share = taken / len(chips)
        if val_fraction > 0 and not val_sources:
            log.warning("all chips come from one image: no validation chips; use --split random")
        elif val_sources and not 0.5 * val_fraction <= share <= 1.5 * val_fraction:
            log.warning(
                "the %d validation image(s) hold %.0f%% of the chips (--val-fraction %g): "
                "the images differ too much in size to split by image; use --split random or "
                "more images",
                len(val_sources),
                100 * share,
                val_fraction,
            )
        for chip, source in zip(chips, sources, strict=True):
            chip.split = "val" if source in val_sources else "train"
    else:
        n_val = min(round(val_fraction * len(chips)), len(chips) - 1)
        for i in rng.permutation(len(chips))[:n_val]:
            chips[i].split = "val"
