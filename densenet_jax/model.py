"""DenseNet in JAX/Flax linen, as d2l section 8.7 builds it: input widths inferred at ``init``,
NHWC, channels on the last axis, a ``training`` field and a mutable ``batch_stats`` collection.

Departures from the book (docs/departures.md): channel counts accumulate across dense blocks
(the book's loop restarts from 64), explicit symmetric padding instead of 'same', exact
(two-pass) batch variance, the dense block is the only place that
concatenates, BatchNorm epsilon/momentum come from ``common.config`` and inputs are checked.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from common.arch import min_input_size
from common.checks import check_images
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig
from common.errors import ConfigError
from densenet_jax.memory_efficient import can_recompute, forward_recomputed


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
    def __call__(self, X: jnp.ndarray) -> jnp.ndarray:
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


class DenseBlock(nn.Module):
    """``num_convs`` conv blocks, each fed the concatenation of the input and all earlier outputs:
    (N, H, W, C) -> (N, H, W, C + num_convs * num_channels)."""

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

    def __call__(self, X: jnp.ndarray) -> jnp.ndarray:
        if self.memory_efficient and can_recompute(self):
            return forward_recomputed(self, X)
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


class DenseNet(nn.Module):
    """The d2l DenseNet: (N, H, W, C) float images -> (N, num_classes) logits.

    ``bn_size``, ``compression``, ``drop_rate`` and ``conv_bias`` give the DenseNet-BC family
    (``common.config.CONFIGS``); their defaults are the book's network. ``lr`` is the book's
    learning rate, kept as ``net.lr`` for the book's trainer; the network itself does not use it.
    The book's arguments do not name the image channels: the network takes 1 (Fashion-MNIST)
    unless built with :meth:`for_config` from a configuration that says otherwise.
    ``memory_efficient`` keeps only each dense layer's new features and recomputes the rest of the
    layer in the backward pass (memory_efficient.py): same function, same weights, less memory.
    """

    num_channels: int = 64
    growth_rate: int = 32
    arch: tuple[int, ...] = (4, 4, 4, 4)
    lr: float = 0.1
    num_classes: int = 10
    bn_size: int | None = None
    compression: float = 0.5
    drop_rate: float = 0.0
    conv_bias: bool = True
    training: bool = True
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
                # Flax pads max pooling with -inf, so padding never wins the max.
                partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
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
        last = [_batch_norm(self.training), nn.relu, partial(jnp.mean, axis=(1, 2)), nn.Dense(self.num_classes)]
        net.append(nn.Sequential(last))
        return net

    @property
    def in_channels(self) -> int:
        """Image channels the network takes: its configuration's."""
        return self.config.in_channels

    def __call__(self, X: jnp.ndarray) -> jnp.ndarray:
        check_images(
            tuple(X.shape),
            jnp.issubdtype(X.dtype, jnp.floating),
            str(X.dtype),
            layout="NHWC",
            in_channels=self.in_channels,
            min_size=min_input_size(self.config),
        )
        for stage in self.net:
            X = stage(X)
            self.sow("intermediates", "stages", X)  # kept where ``intermediates`` is mutable
        return X
