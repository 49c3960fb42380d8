"""Index streams for training (infinite, seekable, sharded) and inference (each index on exactly one rank)."""
from __future__ import annotations

import itertools
from typing import Iterator, Optional, Tuple

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """``(rank, world_size)``: the arguments when given, else torch.distributed's, else ``(0, 1)``."""
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    return rank, world_size


class TrainingSampler:
    """detectron2's TrainingSampler made seekable: an infinite stream of dataset indices for one rank.

    The global stream is one permutation of ``range(size)`` per epoch, epoch ``e`` seeded by ``(seed, e)``
    (``shuffle=False``: the identity). Rank ``r`` takes global positions ``r, r + W, r + 2W, ...`` so ranks read
    disjoint samples within an epoch. ``sampler[p]`` is a pure function of ``(seed, rank, world_size, p)``: resuming
    at position ``p`` continues exactly where a run that got there would be.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.size = size
        self.seed = seed
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.shuffle = shuffle
        self._epoch = -1
        self._order = np.arange(size)

    def global_position(self, position: int) -> int:
        """Where this rank's ``position`` lies in the stream shared by all ranks."""
        return position * self.world_size + self.rank

    def __getitem__(self, position: int) -> int:
        if position < 0:
            raise IndexError(f"stream positions start at 0, got {position}")
        epoch, offset = divmod(self.global_position(position), self.size)
        if self.shuffle and epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._order[offset])

    def __iter__(self) -> Iterator[int]:
        return (self[position] for position in itertools.count())


class InferenceSampler(Sampler[int]):
    """Indices ``0..size-1`` split into contiguous, balanced shards: each on exactly one rank, in order."""

    def __init__(self, size: int, *, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        rank, world_size = resolve_rank(rank, world_size)
        shard, left = divmod(size, world_size)
        begin = rank * shard + min(rank, left)
        self._indices = range(begin, begin + shard + (rank < left))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)
