"""A plain numpy DenseNet forward pass: the oracle every backend is compared against.

Everything is NCHW and works in whatever float dtype it is given (float64 for the oracle).
Weights are a canonical dict (names and shapes from :func:`common.arch.canonical_spec`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from common.arch import CONV3, STEM_CONV, STEM_POOL, TRANSITION_POOL, canonical_spec, plan
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig
from common.errors import InputError
from common.weights.canonical import check_weights

__all__ = [
    "avg_pool2d",
    "batch_norm",
    "conv2d",
    "cross_entropy",
    "dense_block",
    "forward",
    "global_avg_pool",
    "linear",
    "max_pool2d",
    "relu",
    "transition",
]

Weights = Mapping[str, np.ndarray]
Stats = dict[str, np.ndarray]


@dataclass(frozen=True)
class Conventions:
    """Framework conventions the oracle can follow; the defaults are the ones the suite aligns on.

    The alternatives are each framework's own defaults, so ``densenet parity --naive`` can show
    what each would cost: Keras's epsilon 1e-3, Keras/Flax momentum 0.99 (0.01 in PyTorch's
    meaning), the biased running variance of MXNet/Keras/Flax, Flax's fast variance
    E[x^2] - E[x]^2, and the 'same' padding of the book's TF/Flax stride-2 stem.
    """

    eps: float = BN_EPS
    momentum: float = BN_MOMENTUM  # weight of the new batch statistic
    unbiased_running_var: bool = True
    fast_variance: bool = False
    same_padding: bool = False


ALIGNED = Conventions()


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 0 for v in pair):
        raise ValueError(f"{what} must be a non-negative int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _windows(X: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """View of shape ``(N, C, H_out, W_out, kh, kw)`` over an already padded NCHW array."""
    if X.shape[2] < kernel[0] or X.shape[3] < kernel[1]:
        raise InputError(f"a {kernel[0]}x{kernel[1]} window does not fit a {X.shape[2]}x{X.shape[3]} input")
    return sliding_window_view(X, kernel, axis=(2, 3))[:, :, :: stride[0], :: stride[1]]


def conv2d(
    X: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> np.ndarray:
    """2-D cross-correlation (what frameworks call convolution), OIHW kernel, zero padding."""
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if X.ndim != 4 or W.ndim != 4 or X.shape[1] != W.shape[1]:
        raise InputError(f"conv2d needs NCHW input and OIHW kernel with matching C, got {X.shape} and {W.shape}")
    Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = _windows(Xp, W.shape[2:], (sh, sw))
    # tensordot copies the windows into an im2col matrix and hands the product to BLAS.
    Y = np.tensordot(cols, W, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    if b is not None:
        Y = Y + b.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(Y)


def batch_norm(
    X: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    training: bool,
    eps: float = BN_EPS,
    momentum: float = BN_MOMENTUM,
    *,
    unbiased_running_var: bool = True,
    fast_variance: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalisation over every axis but 1: ``(Y, new_running_mean, new_running_var)``.

    Training normalises with the biased batch variance and moves the running statistics by
    ``momentum`` towards the batch ones; PyTorch feeds the running variance the unbiased batch
    variance (``unbiased_running_var=True``), MXNet, Keras and Flax the biased one.
    Inference uses the running statistics and returns them unchanged.
    """
    axes = tuple(i for i in range(X.ndim) if i != 1)
    shape = [1] * X.ndim
    shape[1] = X.shape[1]

    def col(v: np.ndarray) -> np.ndarray:
        return np.asarray(v).reshape(shape)

    if not training:
        Y = (X - col(running_mean)) / np.sqrt(col(running_var) + eps) * col(weight) + col(bias)
        return Y, running_mean, running_var
    n = X.size // X.shape[1]
    if n < 2:
        raise InputError("batch norm in training mode needs more than one value per channel")
    mean = X.mean(axis=axes)
    centred = X - col(mean)
    if fast_variance:  # Flax's default: one pass, cancels catastrophically when |mean| >> std
        var = np.maximum((X * X).mean(axis=axes) - mean * mean, 0)
    else:  # two-pass: subtracting the mean first avoids the cancellation
        var = (centred * centred).mean(axis=axes)
    Y = centred / np.sqrt(col(var) + eps) * col(weight) + col(bias)
    batch_var = var * (n / (n - 1)) if unbiased_running_var else var
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * batch_var
    return Y, new_mean, new_var


def relu(X: np.ndarray) -> np.ndarray:
    """max(X, 0)."""
    return np.maximum(X, 0)


def max_pool2d(
    X: np.ndarray,
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> np.ndarray:
    """Max pooling; padding is -inf, so it is never the maximum (stride defaults to the kernel)."""
    k = _pair(kernel, "kernel")
    s = k if stride is None else _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if ph > k[0] // 2 or pw > k[1] // 2:
        # As in PyTorch: more padding than that could make a window of padding only.
        raise ValueError(f"padding {padding!r} must be at most half the kernel {kernel!r}")
    Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    return _windows(Xp, k, s).max(axis=(4, 5))


def avg_pool2d(X: np.ndarray, kernel: int | tuple[int, int], stride: int | tuple[int, int] | None = None) -> np.ndarray:
    """Average pooling without padding (stride defaults to the kernel)."""
    k = _pair(kernel, "kernel")
    s = k if stride is None else _pair(stride, "stride")
    return _windows(X, k, s).mean(axis=(4, 5))


def global_avg_pool(X: np.ndarray) -> np.ndarray:
    """Mean over H and W: ``(N, C, H, W) -> (N, C)``."""
    return X.mean(axis=(2, 3))


def linear(X: np.ndarray, W: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``X @ W.T + b`` with ``W`` shaped ``(out, in)``."""
    Y = X @ W.T
    return Y if b is None else Y + b


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy of ``(N, K)`` logits against integer labels ``(N,)``."""
    y = np.asarray(y)
    if logits.ndim != 2 or y.shape != logits.shape[:1]:
        raise InputError(f"cross_entropy needs (N, K) logits and (N,) labels, got {logits.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() >= logits.shape[1])):
        raise InputError(f"labels must be integers in [0, {logits.shape[1]}), got {y!r}")
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


# ---------------------------------------------------------------------------------------------
# The network


def _bn_relu(
    X: np.ndarray, weights: Weights, prefix: str, training: bool, stats: Stats, conventions: Conventions
) -> np.ndarray:
    p = f"{prefix}.bn."
    Y, mean, var = batch_norm(
        X,
        weights[p + "weight"],
        weights[p + "bias"],
        weights[p + "running_mean"],
        weights[p + "running_var"],
        training,
        conventions.eps,
        conventions.momentum,
        unbiased_running_var=conventions.unbiased_running_var,
        fast_variance=conventions.fast_variance,
    )
    if training:
        stats[p + "running_mean"] = mean
        stats[p + "running_var"] = var
    return relu(Y)


def _conv(X: np.ndarray, weights: Weights, prefix: str, geometry: tuple[int, int, int]) -> np.ndarray:
    _, stride, padding = geometry
    # DenseNet-BC convolutions carry no bias (config.conv_bias=False).
    return conv2d(X, weights[f"{prefix}.conv.weight"], weights.get(f"{prefix}.conv.bias"), stride, padding)


def dense_block(
    X: np.ndarray,
    weights: Weights,
    prefix: str,
    num_convs: int,
    training: bool,
    *,
    conventions: Conventions = ALIGNED,
) -> tuple[np.ndarray, Stats]:
    """``num_convs`` times BN -> ReLU -> 3x3 conv, each output concatenated onto its input.

    Returns the output and, in training, the updated running statistics of its BatchNorms.
    """
    stats: Stats = {}
    for j in range(1, num_convs + 1):
        p, Y = f"{prefix}.conv{j}", X
        if f"{p}.bottleneck.bn.weight" in weights:  # DenseNet-BC: BN -> ReLU -> 1x1 conv first
            Y = _conv(
                _bn_relu(Y, weights, f"{p}.bottleneck", training, stats, conventions),
                weights,
                f"{p}.bottleneck",
                (1, 1, 0),
            )
        Y = _conv(_bn_relu(Y, weights, p, training, stats, conventions), weights, p, CONV3)
        X = np.concatenate([X, Y], axis=1)
    return X, stats


def transition(
    X: np.ndarray, weights: Weights, prefix: str, training: bool, *, conventions: Conventions = ALIGNED
) -> tuple[np.ndarray, Stats]:
    """BN -> ReLU -> 1x1 conv (halving the channels) -> 2x2 average pool, stride 2."""
    stats: Stats = {}
    Y = _conv(_bn_relu(X, weights, prefix, training, stats, conventions), weights, prefix, (1, 1, 0))
    kernel, stride, _ = TRANSITION_POOL
    return avg_pool2d(Y, kernel, stride), stats


def _pad_same(X: np.ndarray, geometry: tuple[int, int, int], value: float) -> np.ndarray:
    """Pad H and W the way TensorFlow's and Flax's 'same' does for ``(kernel, stride, _)``."""
    kernel, stride, _ = geometry
    pads = [(0, 0), (0, 0)]
    for n in X.shape[2:]:
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(X, pads, constant_values=value)


def forward(
    config: DenseNetConfig,
    weights: Weights,
    X: np.ndarray,
    training: bool = False,
    *,
    conventions: Conventions = ALIGNED,
    dtype: np.dtype | type | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The book's DenseNet on NCHW ``X``: ``(logits, stage outputs, updated running stats)``.

    Stage outputs are keyed like :func:`common.arch.stage_names`. The running statistics are
    returned (by canonical name) only in training mode; in inference the dict is empty.
    ``dtype`` (e.g. ``np.float64``) casts input and weights first; otherwise numpy's promotion
    of their dtypes decides.
    """
    X = np.asarray(X)
    if X.ndim != 4 or X.shape[1] != config.in_channels:
        raise InputError(f"expected NCHW input with {config.in_channels} channel(s), got shape {X.shape}")
    plan(config, X.shape[2:])  # refuses inputs too small for the network
    check_weights(canonical_spec(config), weights, source="reference weights")
    if dtype is not None:
        X = X.astype(dtype)
        weights = {k: np.asarray(v, dtype=dtype) for k, v in weights.items()}

    stages: dict[str, np.ndarray] = {}
    stats: Stats = {}
    if conventions.same_padding:
        # 'same' pads (total // 2, total - total // 2): asymmetric at stride 2 on even sizes.
        Y = _conv(_pad_same(X, STEM_CONV, 0.0), weights, "stem", (STEM_CONV[0], STEM_CONV[1], 0))
        Y = _bn_relu(Y, weights, "stem", training, stats, conventions)
        Y = stages["stem"] = max_pool2d(_pad_same(Y, STEM_POOL, -np.inf), STEM_POOL[0], STEM_POOL[1], 0)
    else:
        Y = _conv(X, weights, "stem", STEM_CONV)
        Y = _bn_relu(Y, weights, "stem", training, stats, conventions)
        kernel, stride, padding = STEM_POOL
        Y = stages["stem"] = max_pool2d(Y, kernel, stride, padding)
    for i, num_convs in enumerate(config.arch, start=1):
        Y, block_stats = dense_block(Y, weights, f"dense{i}", num_convs, training, conventions=conventions)
        stages[f"dense{i}"] = Y
        stats.update(block_stats)
        if i != len(config.arch):
            Y, block_stats = transition(Y, weights, f"transition{i}", training, conventions=conventions)
            stages[f"transition{i}"] = Y
            stats.update(block_stats)
    Y = global_avg_pool(_bn_relu(Y, weights, "head", training, stats, conventions))
    logits = stages["head"] = linear(Y, weights["head.fc.weight"], weights["head.fc.bias"])
    return logits, stages, stats
