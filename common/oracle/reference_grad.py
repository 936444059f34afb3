"""Gradients of the numpy oracle: an explicit backward pass for the book's DenseNet.

``common.oracle.reference.forward`` is the oracle's forward pass, written like the book. This module
adds what the parity suite needs to compare gradients and training steps with a float64 truth:
each layer is a small object whose ``forward`` keeps what its ``backward`` needs, and the
network is assembled from them in canonical order. No framework, no automatic differentiation:
every derivative is written out, and ``tests/test_reference.py`` checks them against finite
differences in float64.

Besides each gradient, the backward pass returns its *scale*: for every gradient tensor, the
largest sum of absolute values of the terms its last reduction adds up (``sum |dY| * |X|`` for a
conv kernel, ``sum |dY * x_hat|`` for a BatchNorm scale, ...). A sum of terms computed in floating
point is wrong by at most about (number of terms) x (unit roundoff) x (that sum), however much the
terms cancel, so the scale is what a rounding error should be measured against
(docs/parity.md, "The error model").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.arch import CONV3, STEM_CONV, STEM_POOL, TRANSITION_POOL, canonical_spec, plan
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig
from common.errors import InputError
from common.oracle.reference import _windows, cross_entropy
from common.training.optim import SGD, SUITE, Convention, sgd_update
from common.weights.canonical import MOMENTUM_BUFFER, check_weights

Weights = Mapping[str, np.ndarray]


def _sum_except_channels(a: np.ndarray) -> np.ndarray:
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != 1))


class _Layer:
    """One differentiable step: ``forward`` caches, ``backward`` returns dX and fills ``grads``."""

    def __init__(self) -> None:
        self.grads: dict[str, np.ndarray] = {}
        self.scales: dict[str, float] = {}

    def forward(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dY: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def input_scale(self, dY_abs: np.ndarray) -> np.ndarray:
        """The sum of absolute terms behind each element of dX (for the input gradient's scale)."""
        raise NotImplementedError


class Conv(_Layer):
    """Zero-padded 2-D cross-correlation, OIHW kernel."""

    def __init__(self, prefix: str, W: np.ndarray, b: np.ndarray | None, stride: int, padding: int) -> None:
        super().__init__()
        self.prefix, self.W, self.b, self.stride, self.padding = prefix, W, b, stride, padding

    def _cols(self, X: np.ndarray) -> np.ndarray:
        p = self.padding
        return _windows(np.pad(X, ((0, 0), (0, 0), (p, p), (p, p))), self.W.shape[2:], (self.stride, self.stride))

    def forward(self, X: np.ndarray) -> np.ndarray:
        self.X = X
        cols = self._cols(X)
        Y = np.tensordot(cols, self.W, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(Y if self.b is None else Y + self.b.reshape(1, -1, 1, 1))

    def _scatter(self, dY: np.ndarray, W: np.ndarray) -> np.ndarray:
        """The transposed convolution: dX = sum over kernel taps of W^T dY, placed at each tap."""
        N, C, H, Wd = self.X.shape
        p, s = self.padding, self.stride
        kh, kw = W.shape[2:]
        Ho, Wo = dY.shape[2:]
        dXp = np.zeros((N, C, H + 2 * p, Wd + 2 * p), dtype=dY.dtype)
        for i in range(kh):
            for j in range(kw):
                # (N, O, Ho, Wo) x (O, C) -> (N, C, Ho, Wo) for this tap
                tap = np.einsum("nohw,oc->nchw", dY, W[:, :, i, j], optimize=True)
                dXp[:, :, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s] += tap
        return dXp[:, :, p : p + H, p : p + Wd]

    def backward(self, dY: np.ndarray) -> np.ndarray:
        cols = self._cols(self.X)
        self.grads[f"{self.prefix}.conv.weight"] = np.tensordot(dY, cols, axes=([0, 2, 3], [0, 2, 3]))
        abs_dY = np.abs(dY)
        self.scales[f"{self.prefix}.conv.weight"] = float(
            np.max(np.tensordot(abs_dY, np.abs(cols), axes=([0, 2, 3], [0, 2, 3])))
        )
        if self.b is not None:
            self.grads[f"{self.prefix}.conv.bias"] = _sum_except_channels(dY)
            self.scales[f"{self.prefix}.conv.bias"] = float(np.max(_sum_except_channels(abs_dY)))
        return self._scatter(dY, self.W)

    def input_scale(self, dY_abs: np.ndarray) -> np.ndarray:
        return self._scatter(dY_abs, np.abs(self.W))


class BatchNorm(_Layer):
    """Batch normalisation over N, H and W; training mode uses and returns batch statistics."""

    def __init__(
        self,
        prefix: str,
        weights: Weights,
        training: bool,
        eps: float = BN_EPS,
        momentum: float = BN_MOMENTUM,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__()
        p = f"{prefix}.bn."
        self.prefix = prefix
        self.gamma, self.beta = weights[p + "weight"], weights[p + "bias"]
        self.running_mean, self.running_var = weights[p + "running_mean"], weights[p + "running_var"]
        self.training, self.eps, self.momentum, self.unbiased = training, eps, momentum, unbiased_running_var
        self.stats: dict[str, np.ndarray] = {}
        self.stat_scales: dict[str, float] = {}

    def forward(self, X: np.ndarray) -> np.ndarray:
        col = (1, -1, 1, 1)
        if not self.training:
            self.inv_std = 1 / np.sqrt(self.running_var + self.eps)
            self.x_hat = (X - self.running_mean.reshape(col)) * self.inv_std.reshape(col)
            return self.x_hat * self.gamma.reshape(col) + self.beta.reshape(col)
        n = X.size // X.shape[1]
        if n < 2:
            raise InputError("batch norm in training mode needs more than one value per channel")
        mean = _sum_except_channels(X) / n
        centred = X - mean.reshape(col)
        var = _sum_except_channels(centred * centred) / n
        self.inv_std = 1 / np.sqrt(var + self.eps)
        self.x_hat = centred * self.inv_std.reshape(col)
        m = self.momentum
        fed = var * (n / (n - 1)) if self.unbiased else var
        p = f"{self.prefix}.bn."
        self.stats[p + "running_mean"] = (1 - m) * self.running_mean + m * mean
        self.stats[p + "running_var"] = (1 - m) * self.running_var + m * fed
        # The batch mean can cancel; its terms are |x| / n.
        abs_mean = _sum_except_channels(np.abs(X)) / n
        self.stat_scales[p + "running_mean"] = float(np.max((1 - m) * np.abs(self.running_mean) + m * abs_mean))
        self.stat_scales[p + "running_var"] = float(np.max(self.stats[p + "running_var"]))
        return self.x_hat * self.gamma.reshape(col) + self.beta.reshape(col)

    def backward(self, dY: np.ndarray) -> np.ndarray:
        if not self.training:
            raise NotImplementedError("gradients are taken in training mode, as every framework trains")
        p, col = f"{self.prefix}.bn.", (1, -1, 1, 1)
        n = dY.size // dY.shape[1]
        self.grads[p + "weight"] = _sum_except_channels(dY * self.x_hat)
        self.grads[p + "bias"] = _sum_except_channels(dY)
        self.scales[p + "weight"] = float(np.max(_sum_except_channels(np.abs(dY * self.x_hat))))
        self.scales[p + "bias"] = float(np.max(_sum_except_channels(np.abs(dY))))
        dx_hat = dY * self.gamma.reshape(col)
        # d/dx of (x - mean) / sqrt(var + eps), through the mean and the variance of the batch.
        sum_dx_hat = _sum_except_channels(dx_hat).reshape(col)
        sum_dx_hat_x_hat = _sum_except_channels(dx_hat * self.x_hat).reshape(col)
        return (self.inv_std.reshape(col) / n) * (n * dx_hat - sum_dx_hat - self.x_hat * sum_dx_hat_x_hat)


class ReLU(_Layer):
    def forward(self, X: np.ndarray) -> np.ndarray:
        self.mask = X > 0
        return np.where(self.mask, X, 0)

    def backward(self, dY: np.ndarray) -> np.ndarray:
        return np.where(self.mask, dY, 0)


class MaxPool(_Layer):
    """Max pooling with -inf padding; the gradient goes to the first maximum of each window."""

    def __init__(self, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.k, self.s, self.p = kernel, stride, padding

    def forward(self, X: np.ndarray) -> np.ndarray:
        p = self.p
        self.shape = X.shape
        win = _windows(
            np.pad(X, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf), (self.k, self.k), (self.s, self.s)
        )
        flat = win.reshape(*win.shape[:4], -1)
        self.argmax = flat.argmax(axis=-1)
        return np.take_along_axis(flat, self.argmax[..., None], axis=-1)[..., 0]

    def backward(self, dY: np.ndarray) -> np.ndarray:
        N, C, H, W = self.shape
        p, s, k = self.p, self.s, self.k
        Ho, Wo = dY.shape[2:]
        dXp = np.zeros((N, C, H + 2 * p, W + 2 * p), dtype=dY.dtype)
        for i in range(k):
            for j in range(k):
                routed = np.where(self.argmax == i * k + j, dY, 0)
                dXp[:, :, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s] += routed
        return dXp[:, :, p : p + H, p : p + W]


class AvgPool(_Layer):
    """Average pooling without padding (the transition's 2x2, stride 2)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.k, self.s = kernel, stride

    def forward(self, X: np.ndarray) -> np.ndarray:
        self.shape = X.shape
        return _windows(X, (self.k, self.k), (self.s, self.s)).mean(axis=(4, 5))

    def backward(self, dY: np.ndarray) -> np.ndarray:
        dX = np.zeros(self.shape, dtype=dY.dtype)
        k, s = self.k, self.s
        Ho, Wo = dY.shape[2:]
        for i in range(k):
            for j in range(k):
                dX[:, :, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s] += dY / (k * k)
        return dX


class GlobalAvgPool(_Layer):
    def forward(self, X: np.ndarray) -> np.ndarray:
        self.shape = X.shape
        return X.mean(axis=(2, 3))

    def backward(self, dY: np.ndarray) -> np.ndarray:
        H, W = self.shape[2:]
        return np.broadcast_to(dY[:, :, None, None] / (H * W), self.shape).copy()


class Linear(_Layer):
    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.W, self.b = W, b

    def forward(self, X: np.ndarray) -> np.ndarray:
        self.X = X
        return X @ self.W.T + self.b

    def backward(self, dY: np.ndarray) -> np.ndarray:
        self.grads["head.fc.weight"] = dY.T @ self.X
        self.grads["head.fc.bias"] = dY.sum(axis=0)
        self.scales["head.fc.weight"] = float(np.max(np.abs(dY).T @ np.abs(self.X)))
        self.scales["head.fc.bias"] = float(np.max(np.abs(dY).sum(axis=0)))
        return dY @ self.W


class Sequence(_Layer):
    def __init__(self, layers: list[_Layer]) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, X: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            X = layer.forward(X)
        return X

    def backward(self, dY: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dY = layer.backward(dY)
        return dY


class DenseLayer(_Layer):
    """One conv block with the dense connection: ``concat(X, block(X))`` on the channel axis."""

    def __init__(self, block: Sequence) -> None:
        super().__init__()
        self.block = block

    def forward(self, X: np.ndarray) -> np.ndarray:
        self.channels = X.shape[1]
        return np.concatenate([X, self.block.forward(X)], axis=1)

    def backward(self, dY: np.ndarray) -> np.ndarray:
        return dY[:, : self.channels] + self.block.backward(dY[:, self.channels :])


def _leaves(layer: _Layer) -> list[_Layer]:
    if isinstance(layer, Sequence):
        return [leaf for sub in layer.layers for leaf in _leaves(sub)]
    if isinstance(layer, DenseLayer):
        return _leaves(layer.block)
    return [layer]


@dataclass
class Gradients:
    """One training-mode forward and backward pass of the oracle (arrays in canonical layout)."""

    loss: float
    logits: np.ndarray
    input: np.ndarray  # dloss/dX, NCHW
    params: dict[str, np.ndarray]  # dloss/dw by canonical name
    stats: dict[str, np.ndarray]  # running statistics after the pass
    # The error model's scale of every tensor above (see the module docstring).
    input_scale: float = 0.0
    param_scales: dict[str, float] = field(default_factory=dict)
    stat_scales: dict[str, float] = field(default_factory=dict)


def build(config: DenseNetConfig, weights: Weights, training: bool, *, unbiased_running_var: bool = True) -> Sequence:
    """The network as differentiable layers, in canonical forward order."""
    if training and config.drop_rate:
        raise InputError("the oracle's gradients are deterministic: it cannot train with dropout (drop_rate > 0)")

    def bn_relu(prefix: str) -> list[_Layer]:
        return [BatchNorm(prefix, weights, training, unbiased_running_var=unbiased_running_var), ReLU()]

    def conv(prefix: str, geometry: tuple[int, int, int]) -> Conv:
        kernel, stride, padding = geometry
        return Conv(prefix, weights[f"{prefix}.conv.weight"], weights.get(f"{prefix}.conv.bias"), stride, padding)

    layers: list[_Layer] = [conv("stem", STEM_CONV), *bn_relu("stem"), MaxPool(*STEM_POOL)]
    for i, num_convs in enumerate(config.arch, start=1):
        for j in range(1, num_convs + 1):
            p = f"dense{i}.conv{j}"
            block: list[_Layer] = []
            if config.bn_size is not None:
                block += [*bn_relu(f"{p}.bottleneck"), conv(f"{p}.bottleneck", (1, 1, 0))]
            block += [*bn_relu(p), conv(p, CONV3)]
            layers.append(DenseLayer(Sequence(block)))
        if i != len(config.arch):
            kernel, stride, _ = TRANSITION_POOL
            layers += [*bn_relu(f"transition{i}"), conv(f"transition{i}", (1, 1, 0)), AvgPool(kernel, stride)]
    layers += [*bn_relu("head"), GlobalAvgPool(), Linear(weights["head.fc.weight"], weights["head.fc.bias"])]
    return Sequence(layers)


def _cross_entropy_and_grad(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """:func:`common.oracle.reference.cross_entropy` and its gradient, (softmax - one_hot) / N."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    d = e / e.sum(axis=1, keepdims=True)
    n = len(y)
    d[np.arange(n), y] -= 1
    return cross_entropy(logits, y), d / n


def loss_and_grads(
    config: DenseNetConfig,
    weights: Weights,
    X: np.ndarray,
    y: np.ndarray,
    *,
    dtype: np.dtype | type = np.float64,
    unbiased_running_var: bool = True,
) -> Gradients:
    """Mean softmax cross-entropy in training mode and its exact gradients (in ``dtype``)."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 4 or X.shape[1] != config.in_channels:
        raise InputError(f"expected NCHW input with {config.in_channels} channel(s), got shape {X.shape}")
    if y.shape != (len(X),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= config.num_classes:
        raise InputError(f"labels must be {len(X)} integers in [0, {config.num_classes}), got {y!r}")
    plan(config, X.shape[2:])
    check_weights(canonical_spec(config), weights, source="reference weights")
    w = {k: np.asarray(v, dtype=dtype) for k, v in weights.items()}
    net = build(config, w, training=True, unbiased_running_var=unbiased_running_var)
    X = X.astype(dtype)
    logits = net.forward(X)
    loss, dY = _cross_entropy_and_grad(logits, y)
    for layer in reversed(net.layers[1:]):
        dY = layer.backward(dY)
    stem = net.layers[0]
    assert isinstance(stem, Conv)
    input_scale = float(np.max(stem.input_scale(np.abs(dY))))
    dX = stem.backward(dY)
    leaves = _leaves(net)
    params: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    stats: dict[str, np.ndarray] = {}
    stat_scales: dict[str, float] = {}
    for leaf in leaves:
        params.update(leaf.grads)
        scales.update(leaf.scales)
        if isinstance(leaf, BatchNorm):
            stats.update(leaf.stats)
            stat_scales.update(leaf.stat_scales)
    order = [k for k in canonical_spec(config) if k in params]
    return Gradients(
        loss,
        logits,
        dX,
        {k: params[k] for k in order},
        stats,
        input_scale,
        {k: scales[k] for k in order},
        stat_scales,
    )


def sgd_steps(
    config: DenseNetConfig,
    weights: Weights,
    batches: list[tuple[np.ndarray, np.ndarray]],
    lr: float,
    *,
    dtype: np.dtype | type = np.float64,
) -> tuple[list[float], dict[str, np.ndarray]]:
    """Plain SGD in training mode, one step per batch: ``(loss before each step, final weights)``."""
    run = optimizer_steps(config, weights, batches, [lr] * len(batches), SGD(), dtype=dtype)
    return run.losses, run.weights


@dataclass
class OptimizerRun:
    """What :func:`optimizer_steps` leaves: the loss before each step, the weights after the last
    (canonical names), the velocities (``<param>.momentum_buffer``; empty without momentum) and,
    per velocity, the error model's scale (sum of the absolute terms it adds up)."""

    losses: list[float]
    weights: dict[str, np.ndarray]
    velocity: dict[str, np.ndarray]
    velocity_scales: dict[str, float] = field(default_factory=dict)


def optimizer_steps(
    config: DenseNetConfig,
    weights: Weights,
    batches: list[tuple[np.ndarray, np.ndarray]],
    lrs: list[float],
    sgd: SGD,
    *,
    velocity: Mapping[str, np.ndarray] | None = None,
    convention: Convention = SUITE,
    dtype: np.dtype | type = np.float64,
) -> OptimizerRun:
    """``sgd`` (``common.training.optim.sgd_update``) in training mode, one step per batch at rate
    ``lrs[i]``, from ``velocity`` (``<param>.momentum_buffer``; zero when not given).
    ``convention`` computes a framework's stock reading of the same words instead (``--naive``)."""
    if len(lrs) != len(batches):
        raise InputError(f"one learning rate per batch: {len(lrs)} rates for {len(batches)} batches")
    w = {k: np.asarray(v, dtype=dtype) for k, v in weights.items()}
    v = {k[: -len(MOMENTUM_BUFFER)]: np.asarray(b, dtype=dtype) for k, b in (velocity or {}).items()}
    losses, scales = [], {}
    for (X, y), lr in zip(batches, lrs):
        g = loss_and_grads(config, w, X, y, dtype=dtype)
        losses.append(g.loss)
        for k, grad in g.params.items():
            old = v.get(k)
            # The velocity is a sum of momentum * old, the gradient and the decay term.
            scales[k] = float(
                sgd.momentum * (np.max(np.abs(old)) if old is not None else 0.0)
                + g.param_scales[k]
                + sgd.weight_decay * np.max(np.abs(w[k]))
            )
            w[k], new = sgd_update(w[k], grad, old, lr, sgd, convention)
            if new is not None:
                v[k] = new
        w.update(g.stats)
    return OptimizerRun(
        losses,
        w,
        {k + MOMENTUM_BUFFER: b for k, b in v.items()},
        {k + MOMENTUM_BUFFER: s for k, s in scales.items() if k in v},
    )
