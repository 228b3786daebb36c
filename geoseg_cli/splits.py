"""Train/validation splits of the chips of ``geoseg tile``: by image, spatial block or chip."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from geoseg_cli.chips import ChipRecord
from geoseg_cli.errors import InputError

log = logging.getLogger(__name__)

#: Validation split rules: whole images, square blocks of the images, or single chips.
SPLITS = ("source", "blocks", "random")
#: Split name of chips that the blocks split leaves out (they straddle both sides).
BUFFER = "buffer"
#: Fewest validation blocks the default block size aims for.
MIN_BLOCKS = 4


def default_block_size(shapes: Sequence[tuple[int, int]], size: int) -> int:
    """Block side for images of ``shapes`` (width, height): 4 × ``size``, or 2 × or 1 ×.

    The smaller sides are used when the images would give fewer than :data:`MIN_BLOCKS`.
    """
    for factor in (4, 2):
        side = factor * size
        if sum(-(-w // side) * -(-h // side) for w, h in shapes) >= MIN_BLOCKS:
            return side
    return size


def _take_groups(sizes: dict[object, int], target: float, total: int, seed: int) -> set:
    """Groups of chips for validation, visited in a seeded order, nearing ``target`` chips.

    Each group is taken when that brings the validation chips nearer ``target`` and leaves
    chips for training.
    """
    rng = np.random.default_rng([seed, 1])
    keys = sorted(sizes)
    taken, chosen = 0, set()
    for i in rng.permutation(len(keys)).tolist():
        n = sizes[keys[i]]
        if taken + n < total and abs(taken + n - target) < abs(taken - target):
            chosen.add(keys[i])
            taken += n
    return chosen


def _split_by_source(
    chips: Sequence[ChipRecord],
    sources: Sequence[int],
    images: Sequence[str],
    fraction: float,
    seed: int,
) -> None:
    """Whole images go to validation; warn when the share of validation chips is far off."""
    per_source = np.bincount(sources, minlength=len(images))
    sizes = {i: int(n) for i, n in enumerate(per_source)}
    val_sources = _take_groups(sizes, fraction * len(chips), len(chips), seed)
    candidates = [i for i, n in sizes.items() if 0 < n < len(chips)]
    if fraction > 0 and not val_sources and candidates:
        val_sources = {min(candidates, key=lambda i: per_source[i])}
    share = sum(per_source[i] for i in val_sources) / len(chips)
    if fraction > 0 and not val_sources:
        empty = [images[i] for i in range(len(images)) if not per_source[i]]
        log.warning(
            "only %s gave chips (%s gave none: too much nodata): no validation chips; use "
            "--split blocks",
            images[int(np.argmax(per_source))],
            ", ".join(empty),
        )
    elif val_sources and not 0.5 * fraction <= share <= 1.5 * fraction:
        smallest = min(n for n in sizes.values() if n) / len(chips)
        cause = (
            f"every image holds at least {smallest:.0%} of the chips: too few images to "
            "split by image"
            if smallest > 1.5 * fraction
            else "the images differ too much in size to split by image"
        )
        log.warning(
            "the %d validation image(s) hold %.0f%% of the chips (--val-fraction %g): %s; "
            "use --split blocks or more images",
            len(val_sources),
            100 * share,
            fraction,
            cause,
        )
    for chip, source in zip(chips, sources, strict=True):
        chip.split = "val" if source in val_sources else "train"


def _touched_blocks(chip: ChipRecord, source: int, block: int) -> set[tuple[int, int, int]]:
    """The (image, block row, block column) of every block a chip overlaps."""
    rows = range(chip.row_off // block, (chip.row_off + chip.height - 1) // block + 1)
    cols = range(chip.col_off // block, (chip.col_off + chip.width - 1) // block + 1)
    return {(source, r, c) for r in rows for c in cols}


def _split_by_blocks(
    chips: Sequence[ChipRecord], sources: Sequence[int], fraction: float, seed: int, block: int
) -> None:
    """Square blocks of ``block`` px go to validation, and chips inside them only.

    A chip is "val" when it lies in validation blocks only, "train" when it touches none,
    else :data:`BUFFER` (left out), so no pixel is in both a training and a validation
    chip. Blocks are visited in a seeded random order and each is taken when that brings
    the validation chips nearer ``fraction`` of all chips and leaves training chips.
    """
    touched = [_touched_blocks(c, s, block) for c, s in zip(chips, sources, strict=True)]
    members: dict[tuple[int, int, int], list[int]] = {}
    for index, blocks in enumerate(touched):
        for key in blocks:
            members.setdefault(key, []).append(index)
    outside = [len(blocks) for blocks in touched]  # touched blocks not (yet) in validation
    target, n_val, n_train = fraction * len(chips), 0, len(chips)
    keys = sorted(members)
    rng = np.random.default_rng([seed, 1])
    val_blocks = set()
    for i in rng.permutation(len(keys)).tolist():
        chosen = members[keys[i]]
        gained = sum(outside[c] == 1 for c in chosen)
        lost = sum(outside[c] == len(touched[c]) for c in chosen)
        if n_train - lost > 0 and abs(n_val + gained - target) < abs(n_val - target):
            val_blocks.add(keys[i])
            n_val, n_train = n_val + gained, n_train - lost
            for c in chosen:
                outside[c] -= 1
    for chip, blocks in zip(chips, touched, strict=True):
        if blocks <= val_blocks:
            chip.split = "val"
        elif blocks.isdisjoint(val_blocks):
            chip.split = "train"
        else:
            chip.split = BUFFER


def assign_splits(
    chips: Sequence[ChipRecord],
    sources: Sequence[int],
    images: Sequence[str],
    mode: str,
    val_fraction: float,
    seed: int,
    block: int,
) -> None:
    """Mark chips "val", "train" (or :data:`BUFFER` by blocks) by image, block or chip.

    By image (``source``) or block (``blocks``), groups are visited in a seeded random
    order and each is taken for validation when that brings the validation chips nearer
    ``val_fraction`` of all chips (by image, the smallest image when none does), never
    leaving training without chips; so images of very different sizes do not put most
    chips in validation. ``random`` sends single chips to validation.

    Args:
        chips: The chips, whose ``split`` is set.
        sources: Each chip's image index.
        images: The image paths.
        mode: One of :data:`SPLITS`.
        val_fraction: Share of validation chips.
        seed: Seed of the draw.
        block: Block side in pixels for ``blocks``.

    Raises:
        InputError: The blocks split left no training chip.
    """
    if mode == "source":
        _split_by_source(chips, sources, images, val_fraction, seed)
    elif mode == "blocks":
        _split_by_blocks(chips, sources, val_fraction, seed, block)
        if not any(c.split == "train" for c in chips):
            raise InputError(
                f"every chip lies in or next to the validation blocks of {block} px; lower "
                "--block-size or --val-fraction, or use --split random"
            )
    else:
        rng = np.random.default_rng([seed, 1])
        n_val = min(round(val_fraction * len(chips)), len(chips) - 1)
        for i in rng.permutation(len(chips))[:n_val]:
            chips[i].split = "val"


def report_split(
    mode: str,
    chips: Sequence[ChipRecord],
    left_out: int,
    block: int,
    val_fraction: float,
    overlap: str | None,
) -> None:
    """Log how a blocks split went, and warn when a random split shares pixels.

    Args:
        mode: One of :data:`SPLITS`.
        chips: The chips kept.
        left_out: Chips the blocks split left out.
        block: Block side in pixels.
        val_fraction: Share of validation chips asked for.
        overlap: Why the chips overlap (e.g. ``--stride 224 < --size 448``), or None.
    """
    n_val = sum(c.split == "val" for c in chips)
    if mode == "blocks":
        log.info(
            "split by %d px blocks: %d validation chips (%.0f%%); %d chip(s) that would "
            "overlap both sides were left out",
            block,
            n_val,
            100 * n_val / len(chips),
            left_out,
        )
        if val_fraction > 0 and not n_val:
            log.warning(
                "no chip lies wholly within the validation blocks of %d px: no validation "
                "chips; give --block-size at least --size + --stride, or larger images",
                block,
            )
    elif mode == "random" and n_val and overlap:
        log.warning(
            "validation chips share pixels with training chips (%s) under --split random, so "
            "validation scores are optimistic; --split blocks (the default for one image) "
            "keeps them apart",
            overlap,
        )
