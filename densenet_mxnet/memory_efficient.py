"""The memory-efficient dense block in MXNet Gluon (not in the book): NCHW, channels on axis 1.

Each dense layer keeps only its new features; the backward pass recomputes the rest of the layer
(the concatenation, BatchNorms, ReLUs and convolutions) through an ``autograd.Function``,
autograd's own custom-function mechanism (Pleiss et al. 2017; docs/performance.md). Gluon has no
checkpointing, and this runs imperatively only: a memory-efficient dense block does not hybridize.
``model.DenseBlock(..., memory_efficient=True)`` runs its conv blocks through
:func:`forward_recomputed`; this module works on them as plain blocks and needs nothing from
``model.py``.
"""

from __future__ import annotations

from densenet_mxnet._compat import mxnet as mx  # restores numpy's removed aliases, then imports MXNet

autograd, nn = mx.autograd, mx.gluon.nn
is_np_array = mx.util.is_np_array

__all__ = ["HybridizesByStage", "KeepsImperative", "can_recompute", "forward_recomputed"]


def _concat(features):
    # The book runs in MXNet's numpy mode (npx.set_np()), where concat is np.concatenate;
    # legacy nd arrays keep the old operator.
    return mx.np.concatenate(features, axis=1) if is_np_array() else mx.nd.concat(*features, dim=1)


class _Recomputed(autograd.Function):
    """``layers(concatenate(features))`` whose intermediate results are not kept: the forward
    pass runs outside autograd's recording, the backward pass runs it again, recorded, and
    backpropagates through that. Gluon's compiled graphs cannot do this (MXNet's backward
    mirroring, ``MXNET_MEMORY_OPT``, exists only for the symbolic executor, not for Gluon's
    CachedOp), so this is autograd's own custom-function mechanism, imperative only.

    On the CPU MXNet's BatchNorm updates its running statistics in its backward pass, which runs
    once, on the recording: they take each batch once."""

    def __init__(self, layers: list) -> None:
        super().__init__()
        self.layers = layers

    def _run(self, features):
        X = _concat(features)
        for layer in self.layers:
            X = layer(X)
        return X

    def forward(self, *features):
        self.save_for_backward(*features)
        self.training = autograd.is_training()
        with autograd.pause(train_mode=self.training):
            return self._run(features)

    def backward(self, dY):
        features = [f.detach() for f in self.saved_tensors]
        for f in features:
            f.attach_grad()
        with autograd.record(train_mode=self.training):
            Y = self._run(features)
        Y.backward(dY)  # also writes the gradients of the layers' parameters
        # Autograd copies what this returns into its own arrays only once it returns: wait for
        # the backward pass just pushed to the engine, or a later step may read them half-written.
        for f in features:
            f.grad.wait_to_read()
        return tuple(f.grad for f in features)


class KeepsImperative:
    """Mixin for the dense block: a memory-efficient one stays imperative when hybridized, since
    its recomputation is an ``autograd.Function``, which a compiled graph cannot run."""

    memory_efficient: bool

    def hybridize(self, active: bool = True, **kwargs) -> None:
        super().hybridize(active and not self.memory_efficient, **kwargs)


class HybridizesByStage:
    """Mixin for the network: a memory-efficient one hybridizes stage by stage, so everything but
    its dense blocks is compiled; one graph of the whole network would swallow their recomputation."""

    memory_efficient: bool
    net: nn.HybridSequential

    def hybridize(self, active: bool = True, **kwargs) -> None:
        if not self.memory_efficient:
            return super().hybridize(active, **kwargs)
        for stage in self.net:
            stage.hybridize(active, **kwargs)


def can_recompute(X) -> bool:  # noqa: N803
    """Whether a dense block's call on ``X`` recomputes: autograd records, and ``X`` is an array
    (a symbol means the block is being compiled, which a recomputation cannot run in)."""
    return autograd.is_recording() and isinstance(X, mx.nd.NDArray)


def forward_recomputed(block: nn.HybridBlock, X):  # noqa: N803
    """The dense block ``block`` (its conv blocks in ``block.net``), keeping only each layer's new
    features: (N, C, H, W) -> (N, C + num_convs * num_channels, H, W).

    Each conv block's concatenation, BatchNorms, ReLUs and convolutions run through
    :class:`_Recomputed` and are recomputed in the backward pass; its dropout runs after them.
    """
    features = [X]  # each layer's new features, stored once; their concatenations are not
    for blk in block.net:
        layers = list(blk)
        # Everything up to the dropout: the concatenation, BatchNorms, ReLUs and convolutions.
        split = len(layers) - 1 if isinstance(layers[-1], nn.Dropout) else len(layers)
        Y = _Recomputed(layers[:split])(*features)
        for layer in layers[split:]:
            Y = layer(Y)
        features.append(Y)
    return _concat(features)
