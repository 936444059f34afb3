"""DenseNet in MXNet Gluon, as d2l section 8.7 builds it: deferred init, NCHW, channels on axis 1.

Departures from the book (docs/departures.md): every block is a HybridBlock so ``hybridize()``
compiles the whole network, BatchNorm epsilon/momentum come from ``common.config`` and inputs are
checked. ``memory_efficient=True`` (not in the book) keeps only each dense layer's new features and
recomputes the rest of the layer in the backward pass (docs/performance.md).
"""

from __future__ import annotations

import numpy as np

from common.checks import check_images
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig, min_input_size
from densenet_mxnet._compat import mxnet as mx  # restores numpy's removed aliases, then imports MXNet

autograd, nn = mx.autograd, mx.gluon.nn
is_np_array = mx.util.is_np_array


def _batch_norm() -> nn.BatchNorm:
    # Gluon's momentum is the weight of the old running value.
    return nn.BatchNorm(momentum=1 - BN_MOMENTUM, epsilon=BN_EPS)


class ConvBlock(nn.HybridSequential):
    """BN -> ReLU -> 3x3 conv: (N, C, H, W) -> (N, num_channels, H, W), only the new features.

    DenseNet-BC: ``bn_size`` puts a BN -> ReLU -> 1x1 conv bottleneck to ``bn_size * num_channels``
    first; ``drop_rate`` adds dropout; ``bias=False`` drops the conv biases.
    """

    def __init__(
        self, num_channels: int, bn_size: int | None = None, drop_rate: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        if bn_size is not None:
            self.add(
                _batch_norm(),
                nn.Activation("relu"),
                nn.Conv2D(bn_size * num_channels, kernel_size=1, use_bias=bias),
            )
        self.add(_batch_norm(), nn.Activation("relu"), nn.Conv2D(num_channels, kernel_size=3, padding=1, use_bias=bias))
        if drop_rate:
            self.add(nn.Dropout(drop_rate))


def conv_block(num_channels: int, **kwargs) -> ConvBlock:
    return ConvBlock(num_channels, **kwargs)


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


class DenseBlock(nn.HybridBlock):
    """``num_convs`` conv blocks, each fed the concatenation of the input and all earlier outputs:
    (N, C, H, W) -> (N, C + num_convs * num_channels, H, W).

    ``memory_efficient``: while autograd records, each conv block's concatenation, first
    BatchNorm, ReLU and first convolution run through :class:`_Recomputed` and are recomputed in
    the backward pass; such a block stays imperative when the network is hybridized.
    """

    def __init__(self, num_convs: int, num_channels: int, memory_efficient: bool = False, **kwargs) -> None:
        super().__init__()
        self.memory_efficient = memory_efficient
        self.net = nn.HybridSequential()
        for _ in range(num_convs):
            self.net.add(conv_block(num_channels, **kwargs))

    def hybridize(self, active: bool = True, **kwargs) -> None:
        if not self.memory_efficient:
            return super().hybridize(active, **kwargs)
        # Compiled pieces inside a recomputation would keep what it exists to drop.
        return super().hybridize(False)

    def forward(self, X):  # noqa: N803
        if self.memory_efficient and autograd.is_recording() and isinstance(X, mx.nd.NDArray):
            features = [X]  # each layer's new features, stored once; their concatenations are not
            for blk in self.net:
                layers = list(blk)
                # Everything up to the dropout: the concatenation, BatchNorms, ReLUs and convolutions.
                split = len(layers) - 1 if isinstance(layers[-1], nn.Dropout) else len(layers)
                Y = _Recomputed(layers[:split])(*features)
                for layer in layers[split:]:
                    Y = layer(Y)
                features.append(Y)
            return _concat(features)
        return super().forward(X)

    def hybrid_forward(self, F, X):  # noqa: N803  (Gluon's signature)
        for i in range(len(self.net)):
            Y = self.net[i](X)
            # The book runs in MXNet's numpy mode (npx.set_np()), where concat is np.concatenate;
            # legacy nd arrays (and symbols) keep the old operator.
            X = F.np.concatenate((X, Y), axis=1) if is_np_array() else F.concat(X, Y, dim=1)
        return X


class TransitionBlock(nn.HybridSequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool: (N, C, H, W) -> (N, num_channels, H/2, W/2)."""

    def __init__(self, num_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.add(
            _batch_norm(),
            nn.Activation("relu"),
            nn.Conv2D(num_channels, kernel_size=1, use_bias=bias),
            nn.AvgPool2D(pool_size=2, strides=2),
        )


def transition_block(num_channels: int, **kwargs) -> TransitionBlock:
    return TransitionBlock(num_channels, **kwargs)


class DenseNet(nn.HybridBlock):
    """The d2l DenseNet: (N, C, H, W) float images -> (N, num_classes) logits.

    ``bn_size``, ``compression``, ``drop_rate`` and ``conv_bias`` give the DenseNet-BC family
    (``common.config.CONFIGS``); their defaults are the book's network. ``lr`` is the book's
    learning rate, kept as ``net.lr`` for the book's trainer; the network itself does not use it.
    The book's arguments do not name the image channels: the network takes 1 (Fashion-MNIST)
    unless built with :meth:`for_config` from a configuration that says otherwise.
    ``memory_efficient`` keeps only each dense layer's new features and recomputes the rest of the
    layer in the backward pass (:class:`DenseBlock`): same function, same weights, less memory; the
    network then hybridizes stage by stage, the dense blocks staying imperative.
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
        layer = {"bn_size": bn_size, "drop_rate": drop_rate, "bias": conv_bias}
        self.net = nn.HybridSequential()
        self.net.add(self.b1(num_channels, conv_bias))
        for i, num_convs in enumerate(arch):
            self.net.add(DenseBlock(num_convs, growth_rate, memory_efficient=memory_efficient, **layer))
            num_channels += num_convs * growth_rate
            if i != len(arch) - 1:
                num_channels = self.config.transition_channels(num_channels)
                self.net.add(transition_block(num_channels, bias=conv_bias))
        last = nn.HybridSequential()
        last.add(_batch_norm(), nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dense(num_classes))
        self.net.add(last)

    @classmethod
    def for_config(cls, config: DenseNetConfig, memory_efficient: bool = False) -> DenseNet:
        """The network of a configuration, e.g. ``common.config.CONFIGS["densenet121"]``."""
        net = cls(**config.book_kwargs(), memory_efficient=memory_efficient)
        net.config = config  # with its in_channels, which the book's arguments do not name
        return net

    def hybridize(self, active: bool = True, **kwargs) -> None:
        if not self.memory_efficient:
            return super().hybridize(active, **kwargs)
        # One compiled graph would swallow the dense blocks' recomputation: compile the other
        # stages one by one and run the network (and the dense blocks) imperatively.
        super().hybridize(False)
        for stage in self.net:
            stage.hybridize(active, **kwargs)
        return None

    @staticmethod
    def b1(num_channels: int = 64, bias: bool = True) -> nn.HybridSequential:
        stem = nn.HybridSequential()
        # Gluon pads max pooling with -inf, so padding never wins the max.
        stem.add(
            nn.Conv2D(num_channels, kernel_size=7, strides=2, padding=3, use_bias=bias),
            _batch_norm(),
            nn.Activation("relu"),
            nn.MaxPool2D(pool_size=3, strides=2, padding=1),
        )
        return stem

    @property
    def in_channels(self) -> int:
        """Image channels the network takes: its configuration's."""
        return self.config.in_channels

    def check_input(self, X) -> None:  # noqa: N803
        check_images(
            X.shape,
            np.issubdtype(X.dtype, np.floating),
            np.dtype(X.dtype).name,
            layout="NCHW",
            in_channels=self.in_channels,
            min_size=min_input_size(self.config),
        )

    def forward(self, X):  # noqa: N803
        # Checked here, before hybrid_forward, where the concrete array (not a symbol) is known.
        if isinstance(X, mx.nd.NDArray):
            self.check_input(X)
        return super().forward(X)

    def hybrid_forward(self, F, X):  # noqa: N803
        return self.net(X)
