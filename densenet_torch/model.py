"""DenseNet in PyTorch, as d2l section 8.7 builds it: lazy modules, NCHW, channels on axis 1.

Departures from the book (docs/departures.md): the dense block is the only place that
concatenates, BatchNorm epsilon/momentum come from ``common.config`` and inputs are checked.
"""

from __future__ import annotations

import torch
from torch import nn

from common.checks import check_images
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig, min_input_size


def _batch_norm() -> nn.LazyBatchNorm2d:
    return nn.LazyBatchNorm2d(eps=BN_EPS, momentum=BN_MOMENTUM)


class ConvBlock(nn.Sequential):
    """BN -> ReLU -> 3x3 conv: (N, C, H, W) -> (N, num_channels, H, W), only the new features."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(_batch_norm(), nn.ReLU(), nn.LazyConv2d(num_channels, kernel_size=3, padding=1))


def conv_block(num_channels: int) -> ConvBlock:
    return ConvBlock(num_channels)


class DenseBlock(nn.Module):
    """``num_convs`` conv blocks, each fed the concatenation of the input and all earlier outputs:
    (N, C, H, W) -> (N, C + num_convs * num_channels, H, W)."""

    def __init__(self, num_convs: int, num_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*(conv_block(num_channels) for _ in range(num_convs)))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)
        return X


class TransitionBlock(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool: (N, C, H, W) -> (N, num_channels, H/2, W/2)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(
            _batch_norm(),
            nn.ReLU(),
            nn.LazyConv2d(num_channels, kernel_size=1),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


def transition_block(num_channels: int) -> TransitionBlock:
    return TransitionBlock(num_channels)


class DenseNet(nn.Module):
    """The d2l DenseNet: (N, C, H, W) float images -> (N, num_classes) logits."""

    def __init__(
        self,
        num_channels: int = 64,
        growth_rate: int = 32,
        arch: tuple[int, ...] = (4, 4, 4, 4),
        lr: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        # Validates every value and gives the channel arithmetic one definition.
        self.config = DenseNetConfig(num_channels, growth_rate, tuple(arch), num_classes, lr=lr)
        self.lr = lr
        self.net = nn.Sequential(self.b1(num_channels))
        for i, num_convs in enumerate(arch):
            self.net.add_module(f"dense_blk{i + 1}", DenseBlock(num_convs, growth_rate))
            num_channels += num_convs * growth_rate
            if i != len(arch) - 1:
                num_channels //= 2
                self.net.add_module(f"tran_blk{i + 1}", transition_block(num_channels))
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

    @staticmethod
    def b1(num_channels: int = 64) -> nn.Sequential:
        return nn.Sequential(
            nn.LazyConv2d(num_channels, kernel_size=7, stride=2, padding=3),
            _batch_norm(),
            nn.ReLU(),
            # torch pads max pooling with -inf, so padding never wins the max.
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )

    @property
    def in_channels(self) -> int | None:
        """Image channels the network was built for; None until the first batch."""
        stem = self.net[0][0]
        return None if isinstance(stem, nn.LazyConv2d) else stem.in_channels

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
