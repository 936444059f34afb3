"""What a run would ask of this machine, checked before any framework allocates it.

An absurd size (``densenet summary --input-size 100000``) is refused with one line instead of
an allocation that fails deep inside a framework, or worse, succeeds and swaps the machine to a
halt. The estimate is every layer's output for the whole batch (what a training step keeps for
its backward pass), from :func:`common.arch.walk`, plus the network's weights and running
statistics (a growth rate of 100,000 needs terabytes of weights for one small image); nothing
here imports a framework.
"""

from __future__ import annotations

import os

import numpy as np

from common.arch import count_bn_stats, count_params, walk
from common.config import DenseNetConfig
from common.errors import InputError

__all__ = ["activation_bytes", "check_memory", "format_bytes", "memory_bytes", "weight_bytes"]


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(
    config: DenseNetConfig, input_size: int | tuple[int, int], batch: int, dtype: str = "float32"
) -> int:
    """Bytes of the input and every layer's output for a batch of ``batch`` images."""
    layers = walk(config, input_size)
    h, w = layers[0].in_size
    elements = config.in_channels * h * w
    for layer in layers:
        elements += layer.out_channels * max(layer.out_size[0], 0) * max(layer.out_size[1], 0)
    return elements * batch * np.dtype(dtype).itemsize


def weight_bytes(config: DenseNetConfig, dtype: str = "float32") -> int:
    """Bytes of the network's parameters and BatchNorm running statistics, held once (a training
    step adds as much again for the gradients, and an optimizer its own state)."""
    return (count_params(config) + count_bn_stats(config)) * np.dtype(dtype).itemsize


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_memory(
    config: DenseNetConfig,
    input_size: int | tuple[int, int],
    batch: int,
    dtype: str = "float32",
    available: int | None = None,
) -> None:
    """Raise :class:`InputError` when the activations and the weights would exceed this machine's memory."""
    have = available if available is not None else memory_bytes()
    if not have:
        return
    activations = activation_bytes(config, input_size, batch, dtype)
    weights = weight_bytes(config, dtype)
    need = activations + weights
    if need > have:
        h, w = walk(config, input_size)[0].in_size
        raise InputError(
            f"DenseNet {config.describe()} on {h}x{w} images in batches of {batch} needs about "
            f"{format_bytes(need)} ({dtype}: {format_bytes(activations)} of activations, {format_bytes(weights)} "
            f"of weights); this machine has {format_bytes(have)} of memory: use a smaller image size, batch size "
            "or network"
        )
