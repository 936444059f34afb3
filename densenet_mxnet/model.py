"""DenseNet in MXNet Gluon, as d2l section 8.7 builds it: deferred init, NCHW, channels on axis 1.

Departures from the book (docs/departures.md): every block is a HybridBlock so ``hybridize()``
compiles the whole network, BatchNorm epsilon/momentum come from ``common.config`` and inputs
are checked.
"""

from __future__ import annotations

import numpy as np

from common.arch import min_input_size
from common.checks import check_images
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig
from densenet_mxnet._compat import mxnet as mx  # restores numpy's removed aliases, then imports MXNet
from densenet_mxnet.memory_efficient import HybridizesByStage, KeepsImperative, can_recompute, forward_recomputed

nn = mx.gluon.nn
is_np_array = mx.util.is_np_array


def _batch_norm() -> nn.BatchNorm:
    # Gluon's momentum is the weight of the old running value.
    return nn.BatchNorm(momentum=1 - BN_MOMENTUM, epsilon=BN_EPS)


class ConvBlock(nn.HybridSequential):
    """BN -> ReLU -> 3x3 conv: (N, C, H, W) -> (N, num_channels, H, W), only the new features.

    DenseNet-BC: ``bn_size`` puts a BN -> ReLU -> 1x1 conv bottleneck to ``bn_size * num_channels``
    first; ``drop_rate`` adds dropout; ``bias=False`` drops the conv biases.
    """

    def __init__(
        self, num_channels: int, bn_size: int | None = None, drop_rate: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        if bn_size is not None:
            self.add(
                _batch_norm(),
                nn.Activation("relu"),
                nn.Conv2D(bn_size * num_channels, kernel_size=1, use_bias=bias),
            )
        self.add(_batch_norm(), nn.Activation("relu"), nn.Conv2D(num_channels, kernel_size=3, padding=1, use_bias=bias))
        if drop_rate:
            self.add(nn.Dropout(drop_rate))


def conv_block(num_channels: int, **kwargs) -> ConvBlock:
    return ConvBlock(num_channels, **kwargs)


class DenseBlock(KeepsImperative, nn.HybridBlock):
    """``num_convs`` conv blocks, each fed the concatenation of the input and all earlier outputs:
    (N, C, H, W) -> (N, C + num_convs * num_channels, H, W)."""

    def __init__(self, num_convs: int, num_channels: int, memory_efficient: bool = False, **kwargs) -> None:
        super().__init__()
        self.memory_efficient = memory_efficient
        self.net = nn.HybridSequential()
        for _ in range(num_convs):
            self.net.add(conv_block(num_channels, **kwargs))

    def hybrid_forward(self, F, X):  # noqa: N803  (Gluon's signature)
        if self.memory_efficient and can_recompute(X):
            return forward_recomputed(self, X)
        for i in range(len(self.net)):
            Y = self.net[i](X)
            # The book runs in MXNet's numpy mode (npx.set_np()), where concat is np.concatenate;
            # legacy nd arrays (and symbols) keep the old operator.
            X = F.np.concatenate((X, Y), axis=1) if is_np_array() else F.concat(X, Y, dim=1)
        return X


class TransitionBlock(nn.HybridSequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool: (N, C, H, W) -> (N, num_channels, H/2, W/2)."""

    def __init__(self, num_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.add(
            _batch_norm(),
            nn.Activation("relu"),
            nn.Conv2D(num_channels, kernel_size=1, use_bias=bias),
            nn.AvgPool2D(pool_size=2, strides=2),
        )


def transition_block(num_channels: int, **kwargs) -> TransitionBlock:
    return TransitionBlock(num_channels, **kwargs)


class DenseNet(HybridizesByStage, nn.HybridBlock):
    """The d2l DenseNet: (N, C, H, W) float images -> (N, num_classes) logits.

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
    ) -> None:
        super().__init__()
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
        self.net = nn.HybridSequential()
        self.net.add(self.b1(num_channels, conv_bias))
        for i, num_convs in enumerate(arch):
            self.net.add(DenseBlock(num_convs, growth_rate, **layer))
            num_channels += num_convs * growth_rate
            if i != len(arch) - 1:
                num_channels = self.config.transition_channels(num_channels)
                self.net.add(transition_block(num_channels, bias=conv_bias))
        last = nn.HybridSequential()
        last.add(_batch_norm(), nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dense(num_classes))
        self.net.add(last)

    @classmethod
    def for_config(cls, config: DenseNetConfig, memory_efficient: bool = False) -> DenseNet:
        """The network of a configuration, e.g. ``common.config.CONFIGS["densenet121"]``."""
        net = cls(**config.book_kwargs(), memory_efficient=memory_efficient)
        net.config = config  # with its in_channels, which the book's arguments do not name
        return net

    @staticmethod
    def b1(num_channels: int = 64, bias: bool = True) -> nn.HybridSequential:
        stem = nn.HybridSequential()
        # Gluon pads max pooling with -inf, so padding never wins the max.
        stem.add(
            nn.Conv2D(num_channels, kernel_size=7, strides=2, padding=3, use_bias=bias),
            _batch_norm(),
            nn.Activation("relu"),
            nn.MaxPool2D(pool_size=3, strides=2, padding=1),
        )
        return stem

    @property
    def in_channels(self) -> int:
        """Image channels the network takes: its configuration's."""
        return self.config.in_channels

    def check_input(self, X) -> None:  # noqa: N803
        check_images(
            X.shape,
            np.issubdtype(X.dtype, np.floating),
            np.dtype(X.dtype).name,
            layout="NCHW",
            in_channels=self.in_channels,
            min_size=min_input_size(self.config),
        )

    def forward(self, X):  # noqa: N803
        # Checked here, before hybrid_forward, where the concrete array (not a symbol) is known.
        if isinstance(X, mx.nd.NDArray):
            self.check_input(X)
        return super().forward(X)

    def hybrid_forward(self, F, X):  # noqa: N803
        return self.net(X)
