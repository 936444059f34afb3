"""The memory-efficient dense block in TensorFlow/Keras (not in the book): NHWC, channels last.

Each dense layer keeps only its new features; the backward pass recomputes the rest of the layer
(the concatenation, BatchNorms, ReLUs and the bottleneck's convolution) in a
``tf.custom_gradient`` (Pleiss et al. 2017; docs/performance.md). ``model.DenseBlock(...,
memory_efficient=True)`` runs its conv blocks through :func:`forward_recomputed`; this module
works on their layers as plain Keras layers and needs nothing from ``model.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record  # TensorFlow's own switch, as tf.recompute_grad uses it

layers = tf.keras.layers

__all__ = ["can_recompute", "forward_recomputed"]


def _recomputed_layer(recomputed: list[layers.Layer]) -> Callable[..., tuple[tf.Tensor, ...]]:
    """``features -> (conv(head(concat(features))), mean, variance[, mean, variance])`` for a conv
    block's layers up to its 3x3 convolution, keeping nothing but ``features`` for the backward
    pass, which recomputes the concatenation, BatchNorms, ReLUs and bottleneck (a
    ``tf.custom_gradient``).

    The 3x3 convolution is not run again: its backward pass needs its input and kernel, not its
    output, so its gradients are TensorFlow's own backprop kernels, called directly
    (``tf.recompute_grad`` of the whole block would rerun it). The BatchNorms normalise with the
    batch statistics as Keras's do in training (the same ``keras.ops`` calls) but update nothing:
    the backward pass runs them again, and the moving statistics must take each batch once. They
    return the statistics instead, for the caller to apply once.
    """
    *head, conv = recomputed

    def run_head(features):
        X, stats = tf.concat(features, axis=-1), []
        for layer in head:
            if isinstance(layer, layers.BatchNormalization):
                # As Keras's own under the mixed policy: a bfloat16 input is normalised in the
                # variables' float32, and handed on in bfloat16.
                compute, X = X.dtype, tf.cast(X, layer.moving_mean.dtype)
                mean, variance = keras.ops.moments(X, axes=[0, 1, 2])
                X = keras.ops.batch_normalization(
                    X, mean, variance, axis=-1, offset=layer.beta, scale=layer.gamma, epsilon=layer.epsilon
                )
                X = tf.cast(X, compute)
                stats += [mean, variance]
            else:
                X = layer(X, training=True)
        return X, stats

    @tf.custom_gradient
    def run(*features: tf.Tensor):
        # tf.custom_gradient lets an enclosing GradientTape record what runs here, which would
        # keep every intermediate result; tf.recompute_grad stops it the same way.
        with record.stop_recording():
            H, stats = run_head(features)
            Y = conv(H)

        def backward(dY, *_stat_grads, variables=None):
            # The statistics only feed the moving averages, never the loss: their cotangents are zero.
            inputs = list(features)
            if not tf.executing_eagerly():
                # In a graph, a recomputation that depends on nothing new is merged with the forward
                # pass or run early, and the memory stays; make it read dY (tf.recompute_grad does
                # the same), without changing a value: 0 unless dY's first element is NaN.
                first = tf.cast(tf.reshape(dY, [-1])[0], tf.bool)
                late = tf.where(first == first, tf.constant(0, dY.dtype), tf.constant(np.nan, dY.dtype))
                inputs[-1] = inputs[-1] + late
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                H, _ = run_head(inputs)
            # In the compute dtype (bfloat16 under the mixed policy), as the forward convolution ran;
            # the variables' gradients in their own dtype.
            kernel, weights = tf.cast(conv.kernel, dY.dtype), conv.kernel.dtype
            strides, padding = [1, *conv.strides, 1], conv.padding.upper()
            dH = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(H), filter=kernel, out_backprop=dY, strides=strides, padding=padding
            )
            own = {id(conv.kernel.value): tf.cast(tf.raw_ops.Conv2DBackpropFilter(
                input=H, filter_sizes=tf.shape(kernel), out_backprop=dY, strides=strides, padding=padding
            ), weights)}  # fmt: skip
            if conv.use_bias:
                own[id(conv.bias.value)] = tf.cast(tf.reduce_sum(dY, axis=[0, 1, 2]), weights)
            variables = variables or []
            rest = [v for v in variables if id(v) not in own]
            grads = tape.gradient(H, [*inputs, *rest], output_gradients=dH)
            by_variable = {**dict(zip((id(v) for v in rest), grads[len(features) :])), **own}
            return grads[: len(features)], [by_variable[id(v)] for v in variables]

        return (Y, *stats), backward

    return run


def _update_moving_statistics(bn: layers.BatchNormalization, mean: tf.Tensor, variance: tf.Tensor) -> None:
    """Keras's own update of the moving statistics (``BatchNormalization.call`` in training)."""
    mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
    bn.moving_mean.assign(bn.moving_mean * bn.momentum + mean * (1.0 - bn.momentum))
    bn.moving_variance.assign(bn.moving_variance * bn.momentum + variance * (1.0 - bn.momentum))


def can_recompute(block: layers.Layer, training: bool) -> bool:
    """Whether this call of the dense block ``block`` recomputes: in training, with every conv
    block built (the recomputed function must find every variable already made)."""
    return bool(training) and all(blk.built for blk in block.net)


def forward_recomputed(block: layers.Layer, X: tf.Tensor) -> tf.Tensor:
    """The dense block ``block`` (its conv blocks in ``block.net``), in training, keeping only each
    layer's new features: (N, H, W, C) -> (N, H, W, C + num_convs * num_channels).

    Each conv block but its dropout runs through :func:`_recomputed_layer` and is recomputed in the
    backward pass; the moving statistics are updated once, here, with the statistics it returns.
    """
    features = [X]  # each layer's new features, stored once; nothing else of a layer is
    for blk in block.net:
        split = len(blk.net) - 1 if isinstance(blk.net[-1], layers.Dropout) else len(blk.net)
        Y, *stats = _recomputed_layer(blk.net[:split])(*features)
        norms = [layer for layer in blk.net if isinstance(layer, layers.BatchNormalization)]
        for bn, mean, variance in zip(norms, stats[::2], stats[1::2]):
            _update_moving_statistics(bn, mean, variance)
        for layer in blk.net[split:]:
            Y = layer(Y, training=True)
        features.append(Y)
    return tf.concat(features, axis=-1)
