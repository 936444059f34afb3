"""DenseNet (d2l section 8.7) in MXNet Gluon."""

from densenet_mxnet.model import (
    ConvBlock,
    DenseBlock,
    DenseNet,
    TransitionBlock,
    conv_block,
    transition_block,
)

__all__ = ["ConvBlock", "DenseBlock", "DenseNet", "TransitionBlock", "conv_block", "transition_block"]
