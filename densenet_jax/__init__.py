"""DenseNet (d2l section 8.7) in JAX/Flax linen."""

from densenet_jax.model import (
    ConvBlock,
    DenseBlock,
    DenseNet,
    TransitionBlock,
    conv_block,
    transition_block,
)

__all__ = ["ConvBlock", "DenseBlock", "DenseNet", "TransitionBlock", "conv_block", "transition_block"]
