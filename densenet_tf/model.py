"""DenseNet in TensorFlow/Keras, as d2l section 8.7 builds it: Keras layers built on first call,
NHWC, channels on the last axis, a ``training`` argument that reaches every BatchNorm.

Departures from the book (docs/departures.md): explicit symmetric padding instead of 'same'
(which pads stride-2 layers asymmetrically), ``training`` passed through so BatchNorm really
trains, the dense block is the only place that concatenates, BatchNorm epsilon/momentum come
from ``common.config`` and inputs are checked.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from common.arch import min_input_size
from common.checks import check_images
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig
from densenet_tf.memory_efficient import can_recompute, forward_recomputed

layers = tf.keras.layers


def _batch_norm() -> layers.BatchNormalization:
    # Keras's momentum is the weight of the old moving value; its default epsilon is 1e-3.
    return layers.BatchNormalization(momentum=1 - BN_MOMENTUM, epsilon=BN_EPS)


class MaxPoolPadded(layers.Layer):
    """Max pooling with symmetric padding that acts as -inf (torch/MXNet semantics).

    Keras offers only 'valid' or 'same'; 'same' pads (0, 1) at stride 2 on even sizes, and a
    ZeroPadding2D would be exact only for non-negative inputs.
    """

    def __init__(self, pool_size: int, strides: int, padding: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pool_size, self.strides, self.padding = pool_size, strides, padding

    def call(self, X: tf.Tensor) -> tf.Tensor:
        p = self.padding
        X = tf.pad(X, [[0, 0], [p, p], [p, p], [0, 0]], constant_values=-np.inf)
        return tf.nn.max_pool2d(X, self.pool_size, self.strides, "VALID")


class ConvBlock(layers.Layer):
    """BN -> ReLU -> 3x3 conv: (N, H, W, C) -> (N, H, W, num_channels), only the new features.

    DenseNet-BC: ``bn_size`` puts a BN -> ReLU -> 1x1 conv bottleneck to ``bn_size * num_channels``
    first; ``drop_rate`` adds dropout; ``bias=False`` drops the conv biases.
    """

    def __init__(
        self, num_channels: int, bn_size: int | None = None, drop_rate: float = 0.0, bias: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.net = []  # the book's listLayers, in call order
        if bn_size is not None:
            self.net += [_batch_norm(), layers.ReLU(), layers.Conv2D(bn_size * num_channels, 1, use_bias=bias)]
        self.net += [
            _batch_norm(),
            layers.ReLU(),
            layers.ZeroPadding2D(1),
            layers.Conv2D(num_channels, 3, use_bias=bias),
        ]
        if drop_rate:
            self.net.append(layers.Dropout(drop_rate))

    def call(self, X: tf.Tensor, training: bool = False) -> tf.Tensor:
        for layer in self.net:
            X = layer(X, training=training)
        return X


def conv_block(num_channels: int, **kwargs) -> ConvBlock:
    return ConvBlock(num_channels, **kwargs)


class DenseBlock(layers.Layer):
    """``num_convs`` conv blocks, each fed the concatenation of the input and all earlier outputs:
    (N, H, W, C) -> (N, H, W, C + num_convs * num_channels)."""

    def __init__(self, num_convs: int, num_channels: int, memory_efficient: bool = False, **kwargs) -> None:
        layer_kwargs = {k: kwargs.pop(k) for k in ("bn_size", "drop_rate", "bias") if k in kwargs}
        super().__init__(**kwargs)
        self.memory_efficient = memory_efficient
        self.net = [conv_block(num_channels, **layer_kwargs) for _ in range(num_convs)]

    def call(self, X: tf.Tensor, training: bool = False) -> tf.Tensor:
        if self.memory_efficient and can_recompute(self, training):
            return forward_recomputed(self, X)
        for blk in self.net:
            Y = blk(X, training=training)
            X = tf.concat([X, Y], axis=-1)
        return X


class TransitionBlock(layers.Layer):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool: (N, H, W, C) -> (N, H/2, W/2, num_channels)."""

    def __init__(self, num_channels: int, bias: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = [
            _batch_norm(),
            layers.ReLU(),
            layers.Conv2D(num_channels, kernel_size=1, use_bias=bias),
            layers.AvgPool2D(pool_size=2, strides=2),
        ]

    def call(self, X: tf.Tensor, training: bool = False) -> tf.Tensor:
        for layer in self.net:
            X = layer(X, training=training)
        return X


def transition_block(num_channels: int, **kwargs) -> TransitionBlock:
    return TransitionBlock(num_channels, **kwargs)


class DenseNet(tf.keras.Model):
    """The d2l DenseNet: (N, H, W, C) float images -> (N, num_classes) logits.

    ``bn_size``, ``compression``, ``drop_rate`` and ``conv_bias`` give the DenseNet-BC family
    (``common.config.CONFIGS``); their defaults are the book's network. ``lr`` is the book's
    learning rate, kept as ``net.lr`` for the book's trainer; the network itself does not use it.
    The book's arguments do not name the image channels: the network takes 1 (Fashion-MNIST)
    unless built with :meth:`for_config` from a configuration that says otherwise.
    ``memory_efficient`` keeps only each dense layer's new features and recomputes the rest of the
    layer in the backward pass (memory_efficient.py): same function, same weights, less memory.
    """

    def __init__(
        self,
        num_channels: int = 64,
        growth_rate: int = 32,
        arch: tuple[int, ...] = (4, 4, 4, 4),
        lr: float = 0.1,
        num_classes: int = 10,
        bn_size: int | None = None,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        conv_bias: bool = True,
        memory_efficient: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        # Validates every value and gives the channel arithmetic one definition.
        self.config = DenseNetConfig(
            num_channels=num_channels,
            growth_rate=growth_rate,
            arch=arch,
            num_classes=num_classes,
            bn_size=bn_size,
            compression=compression,
            drop_rate=drop_rate,
            conv_bias=conv_bias,
        )
        self.lr = lr
        self.memory_efficient = memory_efficient
        layer = {"bn_size": bn_size, "drop_rate": drop_rate, "bias": conv_bias, "memory_efficient": memory_efficient}
        self.net = tf.keras.Sequential([self.b1(num_channels, conv_bias)])
        for i, num_convs in enumerate(arch):
            self.net.add(DenseBlock(num_convs, growth_rate, **layer))
            num_channels += num_convs * growth_rate
            if i != len(arch) - 1:
                num_channels = self.config.transition_channels(num_channels)
                self.net.add(transition_block(num_channels, bias=conv_bias))
        last = [_batch_norm(), layers.ReLU(), layers.GlobalAvgPool2D(), layers.Flatten(), layers.Dense(num_classes)]
        self.net.add(tf.keras.Sequential(last))

    @classmethod
    def for_config(cls, config: DenseNetConfig, memory_efficient: bool = False) -> DenseNet:
        """The network of a configuration, e.g. ``common.config.CONFIGS["densenet121"]``.

        (Not ``from_config``: Keras reserves that name for its own serialisation.)
        """
        net = cls(**config.book_kwargs(), memory_efficient=memory_efficient)
        net.config = config  # with its in_channels, which the book's arguments do not name
        return net

    @staticmethod
    def b1(num_channels: int = 64, bias: bool = True) -> tf.keras.Sequential:
        return tf.keras.Sequential(
            [
                layers.ZeroPadding2D(3),
                layers.Conv2D(num_channels, kernel_size=7, strides=2, use_bias=bias),
                _batch_norm(),
                layers.ReLU(),
                MaxPoolPadded(pool_size=3, strides=2, padding=1),
            ]
        )

    @property
    def in_channels(self) -> int:
        """Image channels the network takes: its configuration's."""
        return self.config.in_channels

    def check_input(self, X: tf.Tensor) -> None:
        dtype = tf.as_dtype(X.dtype)  # a tf.Tensor's, a numpy array's or a KerasTensor's
        check_images(
            tuple(X.shape),
            dtype.is_floating,
            dtype.name,
            layout="NHWC",
            in_channels=self.in_channels,
            min_size=min_input_size(self.config),
        )

    def __call__(self, X: tf.Tensor, *args, **kwargs) -> tf.Tensor:
        # Checked before Keras's __call__, which would re-raise the message wrapped in its own
        # ("Exception encountered when calling DenseNet.call()") and terminal escape codes.
        self.check_input(X)
        return super().__call__(X, *args, **kwargs)

    def call(self, X: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.net(X, training=training)
