"""DenseNet (d2l section 8.7) in PyTorch."""

from densenet_torch.model import (
    ConvBlock,
    DenseBlock,
    DenseNet,
    TransitionBlock,
    conv_block,
    transition_block,
)

__all__ = ["ConvBlock", "DenseBlock", "DenseNet", "TransitionBlock", "conv_block", "transition_block"]
