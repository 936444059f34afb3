"""DenseNet (d2l section 8.7) in TensorFlow/Keras."""

import os

# Keep TensorFlow's C++ start-up chatter (oneDNN, CPU-feature notes) out of the CLI's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from densenet_tf.model import (  # noqa: E402
    ConvBlock,
    DenseBlock,
    DenseNet,
    TransitionBlock,
    conv_block,
    transition_block,
)

__all__ = ["ConvBlock", "DenseBlock", "DenseNet", "TransitionBlock", "conv_block", "transition_block"]
