"""DenseNet (d2l section 8.7) in MXNet Gluon.

Import this package (or ``densenet_mxnet._compat``) before ``mxnet`` itself: it restores the numpy
aliases MXNet 1.9.1 needs.
"""

from densenet_mxnet import _compat  # noqa: F401  (first: numpy aliases before MXNet loads)
from densenet_mxnet.model import (
    ConvBlock,
    DenseBlock,
    DenseNet,
    TransitionBlock,
    conv_block,
    transition_block,
)

__all__ = ["ConvBlock", "DenseBlock", "DenseNet", "TransitionBlock", "conv_block", "transition_block"]
