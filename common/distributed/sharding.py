"""How the shared input pipeline's batches are divided among workers.

Every worker draws the same seeded permutation of the epoch (``common.data``) and takes, from
each global batch of ``batch_size`` indices, its own contiguous slice: worker ``r`` of ``world``
gets ``batch[r * b : (r + 1) * b]`` with ``b = batch_size / world``. Concatenating the workers'
slices in rank order gives back the single-process batch, so a step on ``world`` workers sees
exactly the images one process would see in that step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from common.errors import DenseNetError


class ShardingError(DenseNetError, ValueError):
    """A batch size the workers cannot share equally."""


def check_divisible(batch_size: int, world: int) -> int:
    """The per-worker batch ``batch_size / world``; a batch that does not divide is refused."""
    if world < 1:
        raise ShardingError(f"the number of workers must be at least 1, got {world}")
    if batch_size % world:
        raise ShardingError(
            f"--batch-size {batch_size} cannot be shared equally by {world} workers; give a multiple of {world} "
            "(the batch size is the global one, as in a single process)"
        )
    return batch_size // world


def shard_batches(order: np.ndarray, batch_size: int, rank: int, world: int) -> Iterator[np.ndarray]:
    """This worker's indices of every global batch of the permutation ``order``.

    The epoch's last batch can be shorter than ``batch_size``; its images are shared equally too,
    and the fewer than ``world`` left over are left out of the epoch (every worker must take the
    same number of images in a step: the engines average the workers' gradients with equal weight,
    and a jit over a device mesh needs equal shards).
    """
    if not 0 <= rank < world:
        raise ShardingError(f"worker rank {rank} is outside 0..{world - 1}")
    check_divisible(batch_size, world)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        local = len(batch) // world
        if local:
            yield batch[rank * local : (rank + 1) * local]


def shard_range(count: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of this worker's contiguous share of ``count`` examples (evaluation,
    where every example counts once and shares may differ by one)."""
    if not 0 <= rank < world:
        raise ShardingError(f"worker rank {rank} is outside 0..{world - 1}")
    return count * rank // world, count * (rank + 1) // world
