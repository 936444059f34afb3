"""DenseNet in JAX/Flax linen, as d2l section 8.7 builds it: input widths inferred at ``init``,
NHWC, channels on the last axis, a ``training`` field and a mutable ``batch_stats`` collection.

Departures from the book (docs/departures.md): channel counts accumulate across dense blocks (the
book's loop restarts from 64), explicit symmetric padding instead of 'same', exact (two-pass) batch
variance, the dense block is the only place that concatenates, BatchNorm epsilon/momentum come from
``common.config`` and inputs are checked. ``memory_efficient=True`` (not in the book) keeps only
each dense layer's new features and recomputes the rest of the layer in the backward pass
(docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from common.checks import check_images
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig, min_input_size
from common.errors import ConfigError


def _batch_norm(training: bool) -> nn.BatchNorm:
    # Flax's momentum is the weight of the old running value. Its default fast variance
    # E[x^2] - E[x]^2 loses precision when the mean is large; the two-pass form does not.
    return nn.BatchNorm(
        use_running_average=not training, momentum=1 - BN_MOMENTUM, epsilon=BN_EPS, use_fast_variance=False
    )


class ConvBlock(nn.Module):
    """BN -> ReLU -> 3x3 conv: (N, H, W, C) -> (N, H, W, num_channels), only the new features.

    DenseNet-BC: ``bn_size`` puts a BN -> ReLU -> 1x1 conv bottleneck to ``bn_size * num_channels``
    first; ``drop_rate`` adds dropout (needs a ``dropout`` rng when training); ``bias=False`` drops
    the conv biases.
    """

    num_channels: int
    training: bool = True
    bn_size: int | None = None
    drop_rate: float = 0.0
    bias: bool = True

    @nn.compact
    def __call__(self, X: jnp.ndarray | Sequence[jnp.ndarray]) -> jnp.ndarray:
        if isinstance(X, (list, tuple)):  # the memory-efficient dense block hands over the pieces
            X = jnp.concatenate(X, axis=-1)
        if self.bn_size is not None:
            X = nn.relu(_batch_norm(self.training)(X))
            X = nn.Conv(self.bn_size * self.num_channels, kernel_size=(1, 1), use_bias=self.bias)(X)
        Y = nn.relu(_batch_norm(self.training)(X))
        Y = nn.Conv(self.num_channels, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=self.bias)(Y)
        if self.drop_rate:
            Y = nn.Dropout(self.drop_rate, deterministic=not self.training)(Y)
        return Y


def conv_block(num_channels: int, training: bool = True, **kwargs) -> ConvBlock:
    return ConvBlock(num_channels, training, **kwargs)


def _recomputed(block: ConvBlock):
    """``block`` (unbound, without dropout) as ``(params, batch_stats, features) -> (Y, updated
    batch_stats)`` whose backward pass keeps nothing but its inputs and recomputes the rest.

    ``jax.checkpoint`` (``nn.remat``) cannot do this on XLA:CPU: its recomputation depends only on
    values the forward pass already has, so the compiler merges it back into the forward pass or
    runs it early, and the buffers stay (docs/performance.md). Here the recomputation reads the
    output's cotangent, so it can only run once the backward pass reaches the layer. The 3x3
    convolution is not run again: its backward pass needs its input, not its output, and XLA
    drops the unused forward value.
    """

    def apply(params, batch_stats, features):
        return block.apply({"params": params, "batch_stats": batch_stats}, features, mutable=["batch_stats"])

    @jax.custom_vjp
    def run(params, batch_stats, features):
        Y, updates = apply(params, batch_stats, features)
        return Y, updates["batch_stats"]

    def forward(params, batch_stats, features):
        Y, updates = apply(params, batch_stats, features)
        return (Y, updates["batch_stats"]), (params, batch_stats, features)

    def backward(residuals, cotangents):
        params, batch_stats, features = residuals
        dY = cotangents[0]
        # 0 * (one element of dY): nothing to the value, but a dependency the compiler keeps (it
        # does not fold x * 0 for floats, x being possibly NaN), on the smallest piece.
        late = dY.reshape(-1)[0] * 0
        features = (*features[:-1], features[-1] + late.astype(features[-1].dtype))
        _, vjp = jax.vjp(lambda p, f: apply(p, batch_stats, f)[0], params, features)
        dparams, dfeatures = vjp(dY)
        # The running statistics are no function's input to differentiate: zeros, and the
        # recomputation's own update of them is dropped.
        return dparams, jax.tree_util.tree_map(jnp.zeros_like, batch_stats), dfeatures

    run.defvjp(forward, backward)
    return run


class DenseBlock(nn.Module):
    """``num_convs`` conv blocks, each fed the concatenation of the input and all earlier outputs:
    (N, H, W, C) -> (N, H, W, C + num_convs * num_channels).

    ``memory_efficient``: in training, each conv block runs through :func:`_recomputed`, a
    ``jax.custom_vjp`` whose backward pass recomputes the concatenation, BatchNorms, ReLUs and
    the bottleneck's convolution from the layer's inputs; only each layer's new features are
    kept. The forward pass updates ``batch_stats`` once; the recomputation's update is dropped.
    Its dropout (DenseNet-BC with ``drop_rate``) comes after the recomputed part, from this
    block's own ``Dropout`` modules, so its masks are not the standard network's.
    """

    num_convs: int
    num_channels: int
    training: bool = True
    bn_size: int | None = None
    drop_rate: float = 0.0
    bias: bool = True
    memory_efficient: bool = False

    def setup(self) -> None:
        layer = {"bn_size": self.bn_size, "drop_rate": self.drop_rate, "bias": self.bias}
        self.net = [conv_block(self.num_channels, self.training, **layer) for _ in range(self.num_convs)]
        if self.memory_efficient and self.drop_rate:
            self.dropout = [nn.Dropout(self.drop_rate, deterministic=not self.training) for _ in self.net]

    def __call__(self, X: jnp.ndarray) -> jnp.ndarray:
        recompute = self.training and not self.is_initializing() and self.is_mutable_collection("batch_stats")
        if self.memory_efficient and recompute:
            features = (X,)  # each layer's new features; nothing else of a layer is kept
            for i, blk in enumerate(self.net):
                variables = blk.variables
                run = _recomputed(blk.clone(parent=None, drop_rate=0.0))
                Y, batch_stats = run(variables["params"], variables["batch_stats"], features)
                for name, stats in batch_stats.items():
                    blk.put_variable("batch_stats", name, stats)
                if self.drop_rate:
                    Y = self.dropout[i](Y)
                features = (*features, Y)
            return jnp.concatenate(features, axis=-1)
        for blk in self.net:
            Y = blk(X)
            X = jnp.concatenate((X, Y), axis=-1)
        return X


class TransitionBlock(nn.Module):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool: (N, H, W, C) -> (N, H/2, W/2, num_channels)."""

    num_channels: int
    training: bool = True
    bias: bool = True

    @nn.compact
    def __call__(self, X: jnp.ndarray) -> jnp.ndarray:
        X = nn.relu(_batch_norm(self.training)(X))
        X = nn.Conv(self.num_channels, kernel_size=(1, 1), use_bias=self.bias)(X)
        return nn.avg_pool(X, window_shape=(2, 2), strides=(2, 2))


def transition_block(num_channels: int, training: bool = True, **kwargs) -> TransitionBlock:
    return TransitionBlock(num_channels, training, **kwargs)


def _max_pool(X: jnp.ndarray) -> jnp.ndarray:
    # Flax pads max pooling with -inf, so padding never wins the max.
    return nn.max_pool(X, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _global_avg_pool(X: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(X, axis=(1, 2))


class DenseNet(nn.Module):
    """The d2l DenseNet: (N, H, W, C) float images -> (N, num_classes) logits.

    Each stage's output is sown into the ``intermediates`` collection when it is mutable.
    ``lr`` is the book's learning rate, kept as ``net.lr`` for the book's trainer; the network
    itself does not use it. The book's fields do not name the image channels: the network takes
    1 (Fashion-MNIST) unless built with :meth:`for_config` from a configuration that says otherwise.
    """

    num_channels: int = 64
    growth_rate: int = 32
    arch: tuple[int, ...] = (4, 4, 4, 4)
    lr: float = 0.1
    num_classes: int = 10
    # DenseNet-BC (common.config.CONFIGS); the defaults are the book's network.
    bn_size: int | None = None
    compression: float = 0.5
    drop_rate: float = 0.0
    conv_bias: bool = True
    training: bool = True
    # Keep only each dense layer's new features and recompute the rest in the backward pass
    # (DenseBlock): same function, same variables, less memory.
    memory_efficient: bool = False
    # The whole configuration, in_channels included; for_config sets it, otherwise it is derived
    # from the fields above.
    config: DenseNetConfig | None = None

    def __post_init__(self) -> None:
        # Validates every value and gives the channel arithmetic one definition.
        book = DenseNetConfig(
            num_channels=self.num_channels,
            growth_rate=self.growth_rate,
            arch=self.arch,
            num_classes=self.num_classes,
            bn_size=self.bn_size,
            compression=self.compression,
            drop_rate=self.drop_rate,
            conv_bias=self.conv_bias,
        )
        if self.config is None:
            # Flax's own __setattr__ works only once its __post_init__ has run.
            object.__setattr__(self, "config", book)
        elif self.config.book_kwargs() != book.book_kwargs():
            raise ConfigError(f"DenseNet's fields disagree with its config ({self.config.describe()}); use for_config")
        super().__post_init__()

    @classmethod
    def for_config(cls, config: DenseNetConfig, training: bool = True, memory_efficient: bool = False) -> DenseNet:
        """The network of a configuration, e.g. ``common.config.CONFIGS["densenet121"]``."""
        return cls(**config.book_kwargs(), training=training, memory_efficient=memory_efficient, config=config)

    def setup(self) -> None:
        self.net = self.create_net()

    def b1(self) -> nn.Sequential:
        return nn.Sequential(
            [
                nn.Conv(self.num_channels, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=self.conv_bias),
                _batch_norm(self.training),
                nn.relu,
                _max_pool,
            ]
        )

    def create_net(self) -> list[Any]:
        net: list[Any] = [self.b1()]
        layer = {"bn_size": self.bn_size, "drop_rate": self.drop_rate, "bias": self.conv_bias}
        num_channels = self.num_channels
        for i, num_convs in enumerate(self.arch):
            net.append(
                DenseBlock(num_convs, self.growth_rate, self.training, memory_efficient=self.memory_efficient, **layer)
            )
            num_channels += num_convs * self.growth_rate
            if i != len(self.arch) - 1:
                num_channels = self.config.transition_channels(num_channels)
                net.append(transition_block(num_channels, self.training, bias=self.conv_bias))
        net.append(nn.Sequential([_batch_norm(self.training), nn.relu, _global_avg_pool, nn.Dense(self.num_classes)]))
        return net

    def in_channels(self) -> int:
        """Image channels the network takes: its configuration's."""
        return self.config.in_channels

    def __call__(self, X: jnp.ndarray) -> jnp.ndarray:
        check_images(
            tuple(X.shape),
            jnp.issubdtype(X.dtype, jnp.floating),
            str(X.dtype),
            layout="NHWC",
            in_channels=self.in_channels(),
            min_size=min_input_size(self.config),
        )
        for stage in self.net:
            X = stage(X)
            self.sow("intermediates", "stages", X)
        return X
