"""The architecture, walked once: every layer of a DenseNet configuration in forward order.

:func:`walk` is the one place that knows the order "stem, then each dense block followed by a
transition unless it is the last, then the head". Everything the core needs to know about a
network before any framework runs follows from its layers: the stage names and channel plan,
the spatial size of every stage, the smallest input, the canonical tensor names and shapes, the
parameter, statistic and multiply-add counts and how many values each BatchNorm averages over.

The backends' ``model.py`` files and ``common.oracle.reference.forward`` keep their own book-shaped
loops on purpose: they are the teaching payload and the independent oracle this walk is checked
against. Nothing here imports a framework.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import ConfigError, InputError

if TYPE_CHECKING:  # common.config imports this module for the arithmetic its __post_init__ checks
    from common.config import DenseNetConfig

# Geometry of the fixed layers, as the book defines them: (kernel, stride, padding).
STEM_CONV = (7, 2, 3)
STEM_POOL = (3, 2, 1)
TRANSITION_POOL = (2, 2, 0)
CONV3 = (3, 1, 1)
POINTWISE = (1, 1, 0)  # 1x1 convolutions and every layer that keeps the spatial size

# BatchNorm tensors: scale, shift (trainable) and the running statistics (state).
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
BN_STATE_LEAVES = ("running_mean", "running_var")

# Layer kinds. Only conv, bn and fc hold tensors; "concat" joins a dense layer's input and its
# new features; "globalpool" averages the whole feature map (kernel None).
TENSOR_KINDS = ("conv", "bn", "fc")
KINDS = ("conv", "bn", "relu", "maxpool", "avgpool", "dropout", "concat", "globalpool", "fc")


@dataclass(frozen=True)
class Layer:
    """One layer of the forward pass.

    ``name`` is its canonical prefix (``stem.conv``, ``dense1.conv2.bottleneck.bn``,
    ``transition1.pool``, ``head.fc``): a tensor-holding layer's tensors are ``<name>.<leaf>``.
    ``stage`` is ``stem``, ``dense<i>``, ``transition<i>`` or ``head``. For a ``concat``,
    ``in_channels`` are the new features and ``out_channels`` the dense layer's input with them.
    ``in_size`` and ``out_size`` are (height, width), known when the walk is given an input
    size; a side below 1 means the input is too small (:func:`plan` refuses it).
    """

    name: str
    kind: str
    stage: str
    in_channels: int
    out_channels: int
    kernel: int | None = 1  # None: the whole feature map
    stride: int = 1
    padding: int = 0
    in_size: tuple[int, int] | None = None
    out_size: tuple[int, int] | None = None

    @property
    def holds_tensors(self) -> bool:
        return self.kind in TENSOR_KINDS


def _out(size: int, geometry: tuple[int, int, int]) -> int:
    kernel, stride, pad = geometry
    return (size + 2 * pad - kernel) // stride + 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    if _is_int(input_size):
        hw = (input_size, input_size)
    else:
        try:
            hw = tuple(input_size)  # type: ignore[arg-type]
        except TypeError:
            raise InputError(f"input size must be an int or (height, width), got {input_size!r}") from None
    if len(hw) != 2 or not all(_is_int(v) and v >= 1 for v in hw):
        raise InputError(f"input size must be positive ints (height, width), got {input_size!r}")
    return (int(hw[0]), int(hw[1]))


def walk(config: DenseNetConfig, input_size: int | tuple[int, int] | None = None) -> tuple[Layer, ...]:
    """Every layer of ``config``'s network in forward order; with ``input_size`` (a side or
    (height, width)) also every layer's input and output size. Raises :class:`ConfigError` when a
    transition would compress the channels to zero."""
    return _walk(config, None if input_size is None else _as_hw(input_size))


# Cached: the backends check every batch against min_input_size, and configurations are frozen.
@functools.lru_cache(maxsize=256)
def _walk(config: DenseNetConfig, hw: tuple[int, int] | None) -> tuple[Layer, ...]:
    layers: list[Layer] = []
    channels, size = config.in_channels, hw

    def add(
        name: str, kind: str, out_channels: int | None = None, geometry: tuple[int, int, int] | None = POINTWISE
    ) -> None:
        """Append the next layer, fed what the previous one produced; geometry None: global pool."""
        nonlocal channels, size
        out_channels = channels if out_channels is None else out_channels
        kernel, stride, padding = geometry if geometry is not None else (None, 1, 0)
        out_size = size
        if size is not None:
            out_size = (1, 1) if geometry is None else (_out(size[0], geometry), _out(size[1], geometry))
        stage = name.split(".", 1)[0]
        layers.append(Layer(name, kind, stage, channels, out_channels, kernel, stride, padding, size, out_size))
        channels, size = out_channels, out_size

    add("stem.conv", "conv", config.num_channels, STEM_CONV)
    add("stem.bn", "bn")
    add("stem.relu", "relu")
    add("stem.pool", "maxpool", geometry=STEM_POOL)
    for i, num_convs in enumerate(config.arch, start=1):
        for j in range(1, num_convs + 1):
            prefix, block_in = f"dense{i}.conv{j}", channels
            if config.bn_size is not None:  # DenseNet-BC: a 1x1 bottleneck first
                add(f"{prefix}.bottleneck.bn", "bn")
                add(f"{prefix}.bottleneck.relu", "relu")
                add(f"{prefix}.bottleneck.conv", "conv", config.bn_size * config.growth_rate)
            add(f"{prefix}.bn", "bn")
            add(f"{prefix}.relu", "relu")
            add(f"{prefix}.conv", "conv", config.growth_rate, CONV3)
            if config.drop_rate:
                add(f"{prefix}.dropout", "dropout")
            add(f"{prefix}.concat", "concat", block_in + config.growth_rate)
        if i != len(config.arch):
            kept = config.transition_channels(channels)
            if kept < 1:
                raise ConfigError(f"transition {i} would compress the channels to zero")
            add(f"transition{i}.bn", "bn")
            add(f"transition{i}.relu", "relu")
            add(f"transition{i}.conv", "conv", kept)
            add(f"transition{i}.pool", "avgpool", geometry=TRANSITION_POOL)
    add("head.bn", "bn")
    add("head.relu", "relu")
    add("head.pool", "globalpool", geometry=None)
    add("head.fc", "fc", config.num_classes)
    return tuple(layers)


def _last_of_each_stage(layers: Iterable[Layer]) -> dict[str, Layer]:
    """Stage name -> its last layer (whose output is the stage's), in forward order."""
    last: dict[str, Layer] = {}
    for layer in layers:
        last[layer.stage] = layer
    return last


# ---------------------------------------------------------------------------------------------
# Stages and sizes


@dataclass(frozen=True)
class Stage:
    """One stage of the network: its name and its output channels and spatial size."""

    name: str
    channels: int
    height: int
    width: int

    def shape(self, batch: int) -> tuple[int, ...]:
        """NCHW shape of this stage's output (``(N, classes)`` for the head)."""
        if self.name == "head":
            return (batch, self.channels)
        return (batch, self.channels, self.height, self.width)


def stage_names(config: DenseNetConfig) -> list[str]:
    """``stem, dense1, transition1, ..., dense<n>, head``."""
    return list(_last_of_each_stage(walk(config)))


def plan_channels(config: DenseNetConfig) -> list[tuple[str, int]]:
    """Output channels of every stage, accumulated the way the book's torch code does."""
    return [(name, layer.out_channels) for name, layer in _last_of_each_stage(walk(config)).items()]


def min_input_size(config: DenseNetConfig) -> int:
    """The smallest image side the network can take (29 for four dense blocks)."""
    # Backwards from a 1x1 output: a layer gives at least `need` outputs from
    # (need - 1) * stride + kernel - 2 * padding inputs (floor division in every framework).
    need = 1
    for layer in reversed(walk(config)):
        if layer.kernel is not None:
            need = max(1, (need - 1) * layer.stride + layer.kernel - 2 * layer.padding)
    return need


def _fitted_walk(config: DenseNetConfig, input_size: int | tuple[int, int]) -> tuple[Layer, ...]:
    """:func:`walk` with sizes, refusing an input that some layer would shrink to nothing."""
    layers = _walk(config, _as_hw(input_size))
    empty = next((layer for layer in layers if min(layer.out_size) < 1), None)
    if empty is not None:
        h, w = layers[0].in_size
        smallest = min_input_size(config)
        raise InputError(
            f"input {h}x{w} is too small for this network: the feature map would be empty after "
            f"{empty.stage}; it has {len(config.arch)} dense blocks and needs at least "
            f"{smallest}x{smallest} (resize the images, e.g. Fashion-MNIST's 28x28 to 96x96)"
        )
    return layers


@dataclass(frozen=True)
class NetworkPlan:
    """Every stage's expected output for one configuration and input size."""

    config: DenseNetConfig
    input_size: tuple[int, int]
    stages: tuple[Stage, ...]

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape(batch) for s in self.stages}

    @property
    def num_params(self) -> int:
        return count_params(self.config)

    @property
    def macs(self) -> int:
        """Multiply-adds of one forward pass for one image (convolutions and the dense layer)."""
        return count_macs(self.config, self.input_size)


def plan(config: DenseNetConfig, input_size: int | tuple[int, int] = 96) -> NetworkPlan:
    """Derive each stage's channels and spatial size; refuse inputs too small for the network."""
    layers = _fitted_walk(config, input_size)
    stages = tuple(
        Stage(name, layer.out_channels, *layer.out_size) for name, layer in _last_of_each_stage(layers).items()
    )
    return NetworkPlan(config, layers[0].in_size, stages)


# ---------------------------------------------------------------------------------------------
# Canonical tensors and counts


def canonical_spec(config: DenseNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the network by canonical name, with its shape in the canonical layout.

    Canonical layout: conv kernels OIHW, dense weight (out, in), BatchNorm vectors (C,).
    The order is the order of the forward pass, and every backend exports in this order.
    """
    spec: dict[str, tuple[int, ...]] = {}
    for layer in walk(config):
        if layer.kind == "conv":
            spec[f"{layer.name}.weight"] = (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel)
            if config.conv_bias:
                spec[f"{layer.name}.bias"] = (layer.out_channels,)
        elif layer.kind == "bn":
            for leaf in BN_LEAVES:
                spec[f"{layer.name}.{leaf}"] = (layer.out_channels,)
        elif layer.kind == "fc":
            spec[f"{layer.name}.weight"] = (layer.out_channels, layer.in_channels)
            spec[f"{layer.name}.bias"] = (layer.out_channels,)
    return spec


def canonical_layers(config: DenseNetConfig) -> list[tuple[str, str]]:
    """Every layer that holds tensors, in forward order: ``(prefix, kind)`` with kind ``conv``,
    ``bn`` or ``fc``, e.g. ``("dense1.conv1.bottleneck.bn", "bn")``. Adapters list their own layers
    in the same order, and the canonical names follow from the pairing."""
    return [(layer.name, layer.kind) for layer in walk(config) if layer.holds_tensors]


def is_state(name: str) -> bool:
    """True for running statistics, which are not trainable."""
    return name.rsplit(".", 1)[-1] in BN_STATE_LEAVES


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def count_params(config: DenseNetConfig) -> int:
    """Trainable parameters: conv kernels and biases, BN scale and shift, the dense layer."""
    return sum(_size(shape) for name, shape in canonical_spec(config).items() if not is_state(name))


def count_bn_stats(config: DenseNetConfig) -> int:
    """Running-statistic values (mean and variance of every BatchNorm), not trainable."""
    return sum(_size(shape) for name, shape in canonical_spec(config).items() if is_state(name))


def count_macs(config: DenseNetConfig, input_size: int | tuple[int, int] = 96) -> int:
    """Multiply-adds of one forward pass for one image: every convolution and the dense layer."""
    total = 0
    for layer in _walk(config, _as_hw(input_size)):
        if layer.kind == "conv":
            h, w = layer.out_size
            total += layer.in_channels * layer.out_channels * layer.kernel**2 * h * w
        elif layer.kind == "fc":
            total += layer.in_channels * layer.out_channels
    return total


def bn_counts(config: DenseNetConfig, input_size: int | tuple[int, int], batch: int) -> dict[str, int]:
    """Values each BatchNorm averages over (N*H*W), the n of the unbiased variance n/(n-1).

    Keyed by the BatchNorm's canonical prefix without ``.bn`` (``stem``, ``dense1.conv1``,
    ``dense1.conv1.bottleneck``, ``transition1``, ``head``): the part of its tensor names before
    ``.bn.``. Refuses inputs too small for the network, like :func:`plan`.
    """
    return {
        layer.name.removesuffix(".bn"): batch * layer.in_size[0] * layer.in_size[1]
        for layer in _fitted_walk(config, input_size)
        if layer.kind == "bn"
    }
