"""The torchrun environment of this process (rank, world size, local rank) and its torch device."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from geoseg_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: Where PyTorch runs: ``auto`` picks CUDA when it is available.
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Torchrun:
    """This process's place among the processes ``torchrun`` started (one process: 0 of 1).

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (the GPU it uses).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether several processes run together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes shared outputs (rank 0)."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th from its rank."""
        return list(items[self.rank :: self.world_size])


def torchrun_env() -> Torchrun:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them."""
    return Torchrun(
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(device: str, env: Torchrun | None = None) -> torch.device:
    """The torch device for ``auto``/``cpu``/``cuda``; under torchrun, this rank's GPU.

    Raises:
        UsageError: ``cuda`` was asked for but no CUDA device is available.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    env = env or torchrun_env()
    if device == "cuda" and env.enabled:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device(device)


@contextlib.contextmanager
def process_group(env: Torchrun, device_kind: str) -> Iterator[None]:
    """Join the torchrun process group for the body (NCCL on CUDA, gloo on CPU), if needed.

    A group that already exists (the caller's) is used and left in place.
    """
    if not env.enabled:
        yield
        return
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(
            "nccl" if device_kind == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60)
        )
    try:
        yield
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def barrier(env: Torchrun) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if env.enabled:
        import torch.distributed as dist

        dist.barrier()
