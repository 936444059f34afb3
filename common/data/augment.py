"""Training-time augmentation, the same in every backend: random crop with zero padding, then a
horizontal flip (the standard CIFAR recipe of the DenseNet paper).

Order: uint8 -> [0, 1] -> channels -> bilinear resize to the network's side S -> pad every side
with ``padding(S) = max(1, S // 8)`` zero pixels (4 at 32x32, 12 at 96x96; or a chosen number,
0 for flips only) -> crop an S x S window
at a random offset in [0, 2 * padding] on each axis -> flip left-right with probability 1/2.

Seeding: every epoch draws the offsets and flips of *all* N examples at once from a generator
seeded by ``(seed, epoch)`` (a stream of its own, apart from the shuffle's), and a batch indexes
them by the examples' positions in the split. Example i's augmentation in epoch e therefore
depends only on (seed, e, i), never on the batch it falls in, the batch size or the shuffle.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Draws", "augment_batch", "draw", "padding"]

# Appended to (seed, epoch): the augmentation's random stream, apart from the shuffle's.
_STREAM = 0xA06


def padding(side: int) -> int:
    """Zero pixels added on every side before the random crop: an eighth of the side, at least 1."""
    return max(1, side // 8)


class Draws(NamedTuple):
    """One epoch's augmentation of every example: crop offsets (N, 2) (row, column) in
    [0, 2 * pad], and whether to flip (N,)."""

    pad: int
    offsets: np.ndarray
    flips: np.ndarray


def draw(n: int, side: int, seed: int, epoch: int, pad: int | None = None) -> Draws:
    """The augmentation of all ``n`` examples of a split in ``epoch`` (vectorised: two draws).

    ``pad``: zero pixels on every side before the crop (default ``padding(side)``; 0: flips only)."""
    if pad is None:
        pad = padding(side)
    if pad < 0:
        raise ValueError(f"augmentation padding must be 0 or more pixels, got {pad}")
    rng = np.random.default_rng([seed, epoch, _STREAM])
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    return Draws(pad, offsets, flips)


def augment_batch(X: np.ndarray, draws: Draws, idx: np.ndarray) -> np.ndarray:
    """Pad, crop and flip float (B, C, H, W) images, the examples ``idx`` of the split: one gather."""
    B, C, H, W = X.shape
    p = draws.pad
    padded = np.zeros((B, C, H + 2 * p, W + 2 * p), X.dtype)
    padded[:, :, p : p + H, p : p + W] = X
    offsets, flips = draws.offsets[idx], draws.flips[idx]
    rows = offsets[:, :1] + np.arange(H)  # (B, H)
    cols = offsets[:, 1:] + np.where(flips[:, None], np.arange(W)[::-1], np.arange(W))  # (B, W)
    batch, channel = np.arange(B)[:, None, None, None], np.arange(C)[None, :, None, None]
    out = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    return np.ascontiguousarray(out)
