"""The memory-efficient dense block in JAX/Flax linen (not in the book): NHWC, channels last.

Each dense layer keeps only its new features; the backward pass recomputes the rest of the layer
(the concatenation, BatchNorms, ReLUs and the bottleneck's convolution) in a ``jax.custom_vjp``
(Pleiss et al. 2017; docs/performance.md). ``model.DenseBlock(..., memory_efficient=True)`` runs
its conv blocks through :func:`forward_recomputed`; this module works on them as plain Flax
modules and needs nothing from ``model.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = ["can_recompute", "forward_recomputed"]


def _recomputed(block: nn.Module) -> Callable[..., Any]:
    """The conv block ``block`` (unbound, without dropout) as ``(params, batch_stats, features) ->
    (Y, updated batch_stats)``, ``features`` the pieces it concatenates, whose backward pass keeps
    nothing but its inputs and recomputes the rest.

    ``jax.checkpoint`` (``nn.remat``) cannot do this on XLA:CPU: its recomputation depends only on
    values the forward pass already has, so the compiler merges it back into the forward pass or
    runs it early, and the buffers stay (docs/performance.md). Here the recomputation reads the
    output's cotangent, so it can only run once the backward pass reaches the layer. The 3x3
    convolution is not run again: its backward pass needs its input, not its output, and XLA
    drops the unused forward value.
    """

    def apply(params, batch_stats, features):
        variables = {"params": params, "batch_stats": batch_stats}
        return block.apply(variables, jnp.concatenate(features, axis=-1), mutable=["batch_stats"])

    @jax.custom_vjp
    def run(params, batch_stats, features):
        Y, updates = apply(params, batch_stats, features)
        return Y, updates["batch_stats"]

    def forward(params, batch_stats, features):
        Y, updates = apply(params, batch_stats, features)
        return (Y, updates["batch_stats"]), (params, batch_stats, features)

    def backward(residuals, cotangents):
        params, batch_stats, features = residuals
        dY = cotangents[0]
        # 0 * (one element of dY): nothing to the value, but a dependency the compiler keeps (it
        # does not fold x * 0 for floats, x being possibly NaN), on the smallest piece.
        late = dY.reshape(-1)[0] * 0
        features = (*features[:-1], features[-1] + late.astype(features[-1].dtype))
        _, vjp = jax.vjp(lambda p, f: apply(p, batch_stats, f)[0], params, features)
        dparams, dfeatures = vjp(dY)
        # The running statistics are no function's input to differentiate: zeros, and the
        # recomputation's own update of them is dropped.
        return dparams, jax.tree_util.tree_map(jnp.zeros_like, batch_stats), dfeatures

    run.defvjp(forward, backward)
    return run


def _dropout(block: nn.Module, Y: jnp.ndarray) -> jnp.ndarray:
    """Inverted dropout of ``Y`` at the (bound) block's ``drop_rate``, as ``nn.Dropout`` computes
    it: a module made here could not be, since the dense block declares its modules in ``setup``."""
    keep = 1.0 - block.drop_rate
    mask = jax.random.bernoulli(block.make_rng("dropout"), keep, Y.shape)
    return jnp.where(mask, Y / keep, jnp.zeros_like(Y))


def can_recompute(block: nn.Module) -> bool:
    """Whether this call of the (bound) dense block ``block`` recomputes: in training, with its
    variables made and ``batch_stats`` mutable for the forward pass's update."""
    return block.training and not block.is_initializing() and block.is_mutable_collection("batch_stats")


def forward_recomputed(block: nn.Module, X: jnp.ndarray) -> jnp.ndarray:
    """The (bound) dense block ``block`` (its conv blocks in ``block.net``), keeping only each
    layer's new features: (N, H, W, C) -> (N, H, W, C + num_convs * num_channels).

    Each conv block runs through :func:`_recomputed`. The forward pass updates ``batch_stats``
    once; the recomputation's update is dropped. Its dropout (DenseNet-BC with ``drop_rate``)
    comes after the recomputed part, drawn from the block's ``dropout`` rng (:func:`_dropout`),
    so its masks are not the standard network's.
    """
    features = (X,)  # each layer's new features; nothing else of a layer is kept
    for blk in block.net:
        variables = blk.variables
        run = _recomputed(blk.clone(parent=None, drop_rate=0.0))
        Y, batch_stats = run(variables["params"], variables["batch_stats"], features)
        for name, stats in batch_stats.items():
            blk.put_variable("batch_stats", name, stats)
        if block.drop_rate:
            Y = _dropout(block, Y)
        features = (*features, Y)
    return jnp.concatenate(features, axis=-1)
