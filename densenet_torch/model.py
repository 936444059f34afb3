"""DenseNet in PyTorch, as d2l section 8.7 builds it: lazy modules, NCHW, channels on axis 1.

Departures from the book (docs/departures.md): the dense block is the only place that
concatenates, BatchNorm epsilon/momentum come from ``common.config`` and inputs are checked.
"""

from __future__ import annotations

import torch
from torch import nn

from common.arch import min_input_size
from common.checks import check_images
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig
from densenet_torch.memory_efficient import can_recompute, forward_recomputed


def _batch_norm() -> nn.LazyBatchNorm2d:
    return nn.LazyBatchNorm2d(eps=BN_EPS, momentum=BN_MOMENTUM)


class ConvBlock(nn.Sequential):
    """BN -> ReLU -> 3x3 conv: (N, C, H, W) -> (N, num_channels, H, W), only the new features.

    DenseNet-BC: ``bn_size`` puts a BN -> ReLU -> 1x1 conv bottleneck to ``bn_size * num_channels``
    first; ``drop_rate`` adds dropout; ``bias=False`` drops the conv biases.
    """

    def __init__(
        self, num_channels: int, bn_size: int | None = None, drop_rate: float = 0.0, bias: bool = True
    ) -> None:
        layers: list[nn.Module] = []
        if bn_size is not None:
            layers += [_batch_norm(), nn.ReLU(), nn.LazyConv2d(bn_size * num_channels, kernel_size=1, bias=bias)]
        layers += [_batch_norm(), nn.ReLU(), nn.LazyConv2d(num_channels, kernel_size=3, padding=1, bias=bias)]
        if drop_rate:
            layers.append(nn.Dropout(drop_rate))
        super().__init__(*layers)


def conv_block(num_channels: int, **kwargs) -> ConvBlock:
    return ConvBlock(num_channels, **kwargs)


class DenseBlock(nn.Module):
    """``num_convs`` conv blocks, each fed the concatenation of the input and all earlier outputs:
    (N, C, H, W) -> (N, C + num_convs * num_channels, H, W)."""

    def __init__(self, num_convs: int, num_channels: int, memory_efficient: bool = False, **kwargs) -> None:
        super().__init__()
        self.memory_efficient = memory_efficient
        self.net = nn.Sequential(*(conv_block(num_channels, **kwargs) for _ in range(num_convs)))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self.memory_efficient and can_recompute(self):
            return forward_recomputed(self, X)
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)
        return X


class TransitionBlock(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool: (N, C, H, W) -> (N, num_channels, H/2, W/2)."""

    def __init__(self, num_channels: int, bias: bool = True) -> None:
        super().__init__(
            _batch_norm(),
            nn.ReLU(),
            nn.LazyConv2d(num_channels, kernel_size=1, bias=bias),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


def transition_block(num_channels: int, **kwargs) -> TransitionBlock:
    return TransitionBlock(num_channels, **kwargs)


class DenseNet(nn.Module):
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
        self.net = nn.Sequential(self.b1(num_channels, conv_bias))
        for i, num_convs in enumerate(arch):
            self.net.add_module(f"dense_blk{i + 1}", DenseBlock(num_convs, growth_rate, **layer))
            num_channels += num_convs * growth_rate
            if i != len(arch) - 1:
                num_channels = self.config.transition_channels(num_channels)
                self.net.add_module(f"tran_blk{i + 1}", transition_block(num_channels, bias=conv_bias))
        self.net.add_module(
            "last",
            nn.Sequential(
                _batch_norm(),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                nn.Flatten(),
                nn.LazyLinear(num_classes),
            ),
        )

    @classmethod
    def for_config(cls, config: DenseNetConfig, memory_efficient: bool = False) -> DenseNet:
        """The network of a configuration, e.g. ``common.config.CONFIGS["densenet121"]``."""
        net = cls(**config.book_kwargs(), memory_efficient=memory_efficient)
        net.config = config  # with its in_channels, which the book's arguments do not name
        return net

    @staticmethod
    def b1(num_channels: int = 64, bias: bool = True) -> nn.Sequential:
        return nn.Sequential(
            nn.LazyConv2d(num_channels, kernel_size=7, stride=2, padding=3, bias=bias),
            _batch_norm(),
            nn.ReLU(),
            # torch pads max pooling with -inf, so padding never wins the max.
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )

    @property
    def in_channels(self) -> int:
        """Image channels the network takes: its configuration's."""
        return self.config.in_channels

    def check_input(self, X: torch.Tensor) -> None:
        check_images(
            tuple(X.shape),
            X.is_floating_point(),
            str(X.dtype),
            layout="NCHW",
            in_channels=self.in_channels,
            min_size=min_input_size(self.config),
        )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check_input(X)
        return self.net(X)
