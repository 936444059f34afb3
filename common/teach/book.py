"""The book's code next to ours, one entry per departure in docs/departures.md.

The book's lines are quoted from d2l section 8.7 (its PyTorch, MXNet, JAX and TensorFlow tabs),
shortened to the lines each departure is about. Ours are :class:`~common.teach.sources.Piece`
selectors, extracted from the files when the page is built. The table itself (book, here, why,
pinned by) is read from docs/departures.md, so the page says what the docs say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.teach.sources import Piece, SourceError

__all__ = ["BOOK", "OURS", "Departure", "pinned_tests", "read_departures"]


@dataclass(frozen=True)
class Departure:
    """One row of docs/departures.md."""

    number: int
    book: str
    here: str
    why: str
    pinned_by: str


def read_departures(path: str | Path) -> list[Departure]:
    """The numbered rows of the departures table (Markdown, ``| # | book | here | why | pinned by |``)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            rows.append(Departure(int(cells[0]), *cells[1:]))
    if not rows:
        raise SourceError(f"{path}: no numbered rows in the departures table")
    return rows


def pinned_tests(departure: Departure) -> list[str]:
    """The test ids a row names (``tests/x.py::test_y``, ``::test_z`` continuing the file before it,
    or a whole file ``tests/x.py``)."""
    out: list[str] = []
    current = ""
    for token in re.findall(r"`([^`]+)`", departure.pinned_by):
        if token.startswith("tests/"):
            current = token.split("::", 1)[0]
            out.append(token)
        elif token.startswith("::") and current:
            out.append(current + token)
    return out


def _p(backend: str, module: str, selector: str) -> Piece:
    return Piece(f"densenet_{backend}.{module}", selector)


# The book's lines, per departure: (framework tab, code).
BOOK: dict[int, tuple[tuple[str, str], ...]] = {
    1: (
        (
            "JAX",
            """\
def create_net(self):
    net = self.b1()
    for i, num_convs in enumerate(self.arch):
        net.layers.extend([DenseBlock(num_convs, self.growth_rate,
                                      training=self.training)])
        # The number of output channels in the previous dense block
        num_channels = self.num_channels + (num_convs * self.growth_rate)
        # A transition layer that halves the number of channels is added
        # between the dense blocks
        if i != len(self.arch) - 1:
            num_channels //= 2
            net.layers.extend([TransitionBlock(num_channels,
                                               training=self.training)])""",
        ),
    ),
    2: (
        (
            "TensorFlow",
            """\
class ConvBlock(tf.keras.layers.Layer):
    ...
    def call(self, x):
        y = x
        for layer in self.listLayers.layers:
            y = layer(y)
        y = tf.keras.layers.concatenate([x,y], axis=-1)
        return y""",
        ),
    ),
    3: (
        (
            "TensorFlow",
            """\
def b1(self):
    return tf.keras.models.Sequential([
        tf.keras.layers.Conv2D(
            64, kernel_size=7, strides=2, padding='same'),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.ReLU(),
        tf.keras.layers.MaxPool2D(
            pool_size=3, strides=2, padding='same')])""",
        ),
        (
            "JAX",
            """\
def b1(self):
    return nn.Sequential([
        nn.Conv(64, kernel_size=(7, 7), strides=(2, 2), padding='same'),
        nn.BatchNorm(not self.training),
        nn.relu,
        lambda x: nn.max_pool(x, window_shape=(3, 3),
                              strides=(2, 2), padding='same')
    ])""",
        ),
    ),
    4: (
        (
            "MXNet",
            """\
class DenseBlock(nn.Block):
    def __init__(self, num_convs, num_channels):
        super().__init__()
        self.net = nn.Sequential()
        for _ in range(num_convs):
            self.net.add(conv_block(num_channels))

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            # Concatenate input and output of each block along the channels
            X = np.concatenate((X, Y), axis=1)
        return X""",
        ),
    ),
    5: (
        (
            "PyTorch",
            """\
def init_cnn(module):  #@save
    \"\"\"Initialize weights for CNNs.\"\"\"
    if type(module) == nn.Linear or type(module) == nn.Conv2d:
        nn.init.xavier_uniform_(module.weight)

# at the end of DenseNet.__init__, while every layer is still lazy:
    self.net.apply(d2l.init_cnn)""",
        ),
    ),
    6: (
        (
            "JAX",
            """\
class ConvBlock(nn.Module):
    num_channels: int
    training: bool = True

    @nn.compact
    def __call__(self, X):
        Y = nn.relu(nn.BatchNorm(not self.training)(X))
        Y = nn.Conv(self.num_channels, kernel_size=(3, 3), padding=(1, 1))(Y)
        Y = jnp.concatenate((X, Y), axis=-1)
        return Y""",
        ),
        (
            "PyTorch",
            """\
def conv_block(num_channels):
    return nn.Sequential(
        nn.LazyBatchNorm2d(), nn.ReLU(),
        nn.LazyConv2d(num_channels, kernel_size=3, padding=1))""",
        ),
    ),
    7: (
        (
            "TensorFlow",
            """\
self.bn = tf.keras.layers.BatchNormalization()  # epsilon 1e-3, momentum 0.99""",
        ),
        (
            "JAX",
            """\
nn.BatchNorm(not self.training)  # momentum 0.99, fast variance E[x^2] - E[x]^2""",
        ),
    ),
    8: (
        (
            "PyTorch",
            """\
def forward(self, X):  # d2l.Module: no check of rank, dtype, channels or size
    return self.net(X)""",
        ),
    ),
    9: (
        (
            "JAX",
            """\
net.layers.extend([
    nn.BatchNorm(not self.training),
    nn.relu,
    lambda x: nn.avg_pool(x, window_shape=x.shape[1:3],
                          strides=x.shape[1:3], padding='valid'),
    lambda x: x.reshape((x.shape[0], -1)),
    nn.Dense(self.num_classes)
])""",
        ),
    ),
    10: (
        (
            "PyTorch",
            """\
def forward(self, X):
    for blk in self.net:
        Y = blk(X)
        # Concatenate input and output of each block along the channels
        X = torch.cat((X, Y), dim=1)
    return X""",
        ),
    ),
}

# Ours, per departure: the code that departs, read from the files at build time.
OURS: dict[int, tuple[Piece, ...]] = {
    1: (_p("jax", "model", "DenseNet.create_net"),),
    2: (_p("tf", "model", "ConvBlock.call"), _p("tf", "model", "DenseNet.call")),
    3: (_p("tf", "model", "DenseNet.b1"), _p("tf", "model", "MaxPoolPadded.call"), _p("jax", "model", "DenseNet.b1")),
    4: (_p("mxnet", "model", "DenseBlock"),),
    5: (_p("torch", "adapter", "TorchAdapter.build"),),
    6: (_p("jax", "model", "ConvBlock"), _p("jax", "model", "DenseBlock.__call__")),
    7: (_p("tf", "model", "_batch_norm"), _p("jax", "model", "_batch_norm")),
    8: (_p("torch", "model", "DenseNet.check_input"),),
    9: (_p("jax", "model", "DenseNet.create_net::last = ..nn.Sequential(last)"),),
    10: (
        _p("torch", "model", "DenseBlock.forward"),
        _p("torch", "memory_efficient", "forward_recomputed"),
        _p("mxnet", "memory_efficient", "HybridizesByStage"),
    ),
}
