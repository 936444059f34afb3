"""One input pipeline for every data set and all four backends: scale uint8 to [0, 1], convert
the channels to the network's, bilinear resize, optional augmentation, seeded per-epoch shuffle,
batches.

The same seed gives the same batches, in the same order, whichever backend consumes them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.augment import augment_batch, draw
from common.distributed.sharding import shard_batches
from common.errors import DenseNetError

# ITU-R BT.601 luma, the weights Pillow's ``convert("L")`` uses: colour -> one channel.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class DataError(DenseNetError, ValueError):
    """A missing, truncated or malformed data file."""


@dataclass(frozen=True)
class Split:
    """Images and labels of one split: uint8 images (N, H, W) (one channel, Fashion-MNIST) or
    (N, C, H, W), and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, object]:
    """A file a run read, for its ``run.json``: path, size and SHA-256."""
    path = Path(path).resolve()
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256(path)}


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of half-pixel-centred bilinear resizing along one axis (as
    torchvision's Resize and tf.image.resize do, without antialiasing)."""
    scale = n_in / n_out
    x = (np.arange(n_out) + 0.5) * scale - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = x - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def convert_channels(X: np.ndarray, channels: int) -> np.ndarray:
    """(N, C, H, W) -> (N, channels, H, W): grey is repeated into colour, colour becomes its luma."""
    have = X.shape[1]
    if have == channels:
        return X
    if have == 1 and channels == 3:
        return np.repeat(X, 3, axis=1)
    if have == 3 and channels == 1:
        return np.einsum("nchw,c->nhw", X, LUMA.astype(X.dtype))[:, None]
    raise DataError(
        f"images with {have} channel(s) cannot feed a network with in_channels={channels}; "
        "image data converts between 1 (grey) and 3 (RGB) channels only"
    )


def preprocess(images: np.ndarray, size: int | None, channels: int | None = None) -> np.ndarray:
    """uint8 (N, H, W) or (N, C, H, W) -> float32 (N, channels, size, size) in [0, 1], bilinearly
    resized (``channels`` None: the images' own)."""
    X = images.astype(np.float32) / 255.0
    if X.ndim == 3:
        X = X[:, None]
    if channels is not None:
        X = convert_channels(X, channels)
    if size is not None and (size, size) != X.shape[-2:]:
        rows = _bilinear_matrix(X.shape[2], size).astype(np.float32)
        cols = _bilinear_matrix(X.shape[3], size).astype(np.float32)
        X = rows @ X @ cols.T  # two small matmuls per image, batched
    return np.ascontiguousarray(X)


def batches(
    split: Split,
    batch_size: int,
    size: int | None,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    augment: bool = False,
    augment_padding: int | None = None,
    channels: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """NCHW float32 batches and labels; the order depends only on ``(seed, epoch)``, and with
    ``augment`` (:mod:`common.data.augment`) each image's crop and flip only on ``(seed, epoch,
    its index in the split)``; ``augment_padding`` overrides the crop's padding (0: flips only).

    ``shard=(rank, world)``: only worker ``rank``'s share of every batch of ``batch_size``
    (``common.distributed.sharding.shard_batches``)."""
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    order = np.arange(len(split.labels))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(order)
    draws = None
    if augment:
        side = size if size is not None else split.images.shape[-1]
        draws = draw(len(split.labels), side, seed, epoch, augment_padding)
    if shard is not None:
        chunks = shard_batches(order, batch_size, *shard)
    else:
        chunks = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
    for idx in chunks:
        X = preprocess(split.images[idx], size, channels)
        if draws is not None:
            X = augment_batch(X, draws, idx)
        yield X, split.labels[idx]


def subset(split: Split, limit: int | None) -> Split:
    """The first ``limit`` examples (all when None)."""
    if limit is None:
        return split
    if limit < 1:
        raise DataError(f"--limit must be positive, got {limit}")
    return Split(split.images[:limit], split.labels[:limit])
