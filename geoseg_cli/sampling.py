"""Training-chip samplers: the paper's shuffled pass, class-balanced draws and longer epochs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from geoseg_cli.chips import ChipRecord
from geoseg_cli.distributed import Torchrun
from geoseg_cli.train_config import TrainConfig


def balanced_weights(class_counts: np.ndarray) -> np.ndarray:
    """Chip probabilities that sample every class alike.

    A draw picks one of the classes present (uniformly), then a chip with probability
    proportional to its pixels of that class: chip i gets ``Σ_c n_ic / N_c / K``, where
    ``n_ic`` are its pixels of class c, ``N_c`` all training pixels of c and K the number
    of classes present. Chips without labelled pixels are never drawn.

    Args:
        class_counts: Chips × classes labelled-pixel counts (manifest ``count_*`` columns).

    Returns:
        Probabilities summing to 1 (uniform when no chip has a labelled pixel).
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    totals = counts.sum(axis=0)
    present = totals > 0
    if not present.any():
        return np.full(len(counts), 1 / len(counts))
    weights = (counts[:, present] / totals[present]).sum(axis=1)
    return weights / weights.sum()


class ChipSampler(Sampler):
    """Seeded draws of training chips, sharded over torchrun ranks.

    An epoch is ``num_samples`` draws (rounded up to a multiple of ``world_size``): with
    no ``weights``, seeded permutations of every chip one after the other (each chip as
    often as the others); with ``weights``, independent draws with those probabilities
    (e.g. :func:`balanced_weights`). The draws depend only on (seed, epoch), so every rank
    agrees on them and a resumed run repeats them; rank r takes draws r, r + world_size,
    ... and yields ``(chip index, draw)`` for :class:`~geoseg_cli.data.ChipDataset`.

    Args:
        num_chips: Chips to draw from.
        num_samples: Draws per epoch (all ranks together).
        weights: Per-chip probabilities, or None for permutations.
        seed: Seed of the draws.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(
        self,
        num_chips: int,
        num_samples: int,
        weights: np.ndarray | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_chips = num_chips
        self.total = -(-num_samples // world_size) * world_size
        self.weights = weights
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def draws(self) -> np.ndarray:
        """The chip index of every draw of the current epoch (all ranks)."""
        rng = np.random.default_rng((self.seed, self.epoch, self.num_chips))
        if self.weights is not None:
            return rng.choice(self.num_chips, size=self.total, p=self.weights)
        rounds = -(-self.total // self.num_chips)
        return np.concatenate([rng.permutation(self.num_chips) for _ in range(rounds)])[
            : self.total
        ]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        chips = self.draws()
        for draw in range(self.rank, self.total, self.world_size):
            yield int(chips[draw]), draw

    def __len__(self) -> int:
        return self.total // self.world_size


def train_sampler(
    config: TrainConfig, records: Sequence[ChipRecord], ctx: Torchrun
) -> DistributedSampler | ChipSampler:
    """The paper's one shuffled pass per epoch, or a :class:`ChipSampler` for balanced draws."""
    if config.sampler == "uniform" and config.min_epoch_samples <= len(records):
        return DistributedSampler(
            range(len(records)), ctx.world_size, ctx.rank, shuffle=True, seed=config.seed
        )
    weights = None
    if config.sampler == "balanced":
        weights = balanced_weights(np.array([r.counts for r in records]))
    samples = max(len(records), config.min_epoch_samples)
    return ChipSampler(len(records), samples, weights, config.seed, ctx.rank, ctx.world_size)


def chip_index(item: int | tuple[int, int]) -> int:
    """The chip index of a sampler item (an index, or ``(chip index, draw)``)."""
    return item[0] if isinstance(item, tuple) else item
