"""The DenseNet configuration and its channel/spatial arithmetic, written once for all backends.

Nothing here imports a framework: the plan is pure integer arithmetic, so the harness can tell
what every backend *should* produce before any of them runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError, InputError

# BatchNorm conventions every backend is configured with, so they compute the same function.
# The frameworks' own defaults differ (see docs/parity.md); these are PyTorch's and MXNet's.
BN_EPS = 1e-5
# Weight of the *new* batch statistic in the running average (PyTorch's meaning of "momentum").
# MXNet, Keras and Flax use the complementary weight of the old value: 1 - BN_MOMENTUM.
BN_MOMENTUM = 0.1

# Geometry of the fixed layers, as the book defines them: (kernel, stride, padding).
STEM_CONV = (7, 2, 3)
STEM_POOL = (3, 2, 1)
TRANSITION_POOL = (2, 2, 0)
CONV3 = (3, 1, 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DenseNetConfig:
    """The book's ``DenseNet(num_channels=64, growth_rate=32, arch=(4, 4, 4, 4), num_classes=10)``.

    ``in_channels`` is the number of image channels (1 for Fashion-MNIST). ``lr`` is kept because
    the book's class carries it; only training code reads it.
    """

    num_channels: int = 64
    growth_rate: int = 32
    arch: tuple[int, ...] = (4, 4, 4, 4)
    num_classes: int = 10
    in_channels: int = 1
    lr: float = 0.1
    # DenseNet-BC (Huang et al.): a 1x1 bottleneck to ``bn_size * growth_rate`` channels before
    # each 3x3 conv (None: the book's plain conv block), the fraction of channels a transition
    # keeps, dropout after each dense layer, and whether convolutions carry a bias (the book's
    # do; the paper's, torchvision's, Keras's and Gluon's do not).
    bn_size: int | None = None
    compression: float = 0.5
    drop_rate: float = 0.0
    conv_bias: bool = True

    def __post_init__(self) -> None:
        arch = self.arch
        if isinstance(arch, (str, bytes)) or not hasattr(arch, "__iter__"):
            raise ConfigError(f"arch must be a sequence of positive ints, got {arch!r}")
        arch = tuple(arch)
        object.__setattr__(self, "arch", arch)
        if not arch:
            raise ConfigError("arch must name at least one dense block, got an empty sequence")
        for i, n in enumerate(arch):
            if not _is_int(n) or n < 1:
                raise ConfigError(f"arch[{i}] must be a positive int (convolutions in dense block {i + 1}), got {n!r}")
        for field in ("num_channels", "growth_rate", "num_classes", "in_channels"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{field} must be a positive int, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.bn_size is not None and (not _is_int(self.bn_size) or self.bn_size < 1):
            raise ConfigError(f"bn_size must be a positive int or None (no bottleneck), got {self.bn_size!r}")
        if not _is_number(self.compression) or not 0 < self.compression <= 1:
            raise ConfigError(f"compression must be in (0, 1], got {self.compression!r}")
        if not _is_number(self.drop_rate) or not 0 <= self.drop_rate < 1:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not isinstance(self.conv_bias, bool):
            raise ConfigError(f"conv_bias must be True or False, got {self.conv_bias!r}")
        # Halving must leave at least one channel for every transition.
        plan_channels(self)

    def transition_channels(self, channels: int) -> int:
        """Channels a transition keeps: ``channels // 2`` for the book's 0.5."""
        return int(channels * self.compression)

    def replace(self, **changes: Any) -> DenseNetConfig:
        """A copy with some fields changed (validated like a new configuration)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for people: ``num_channels=64 growth_rate=32 arch=4,4,4,4 ...``."""
        text = (
            f"num_channels={self.num_channels} growth_rate={self.growth_rate} "
            f"arch={','.join(map(str, self.arch))} num_classes={self.num_classes} in_channels={self.in_channels}"
        )
        if self.bn_size is not None:
            text += f" bn_size={self.bn_size}"
        if self.compression != 0.5:
            text += f" compression={self.compression}"
        if self.drop_rate:
            text += f" drop_rate={self.drop_rate}"
        if not self.conv_bias:
            text += " conv_bias=False"
        return text

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch"] = list(self.arch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)


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


def _out(size: int, geometry: tuple[int, int, int]) -> int:
    kernel, stride, pad = geometry
    return (size + 2 * pad - kernel) // stride + 1


def stage_names(config: DenseNetConfig) -> list[str]:
    """``stem, dense1, transition1, ..., dense<n>, head``."""
    names = ["stem"]
    for i in range(len(config.arch)):
        names.append(f"dense{i + 1}")
        if i != len(config.arch) - 1:
            names.append(f"transition{i + 1}")
    names.append("head")
    return names


def plan_channels(config: DenseNetConfig) -> list[tuple[str, int]]:
    """Output channels of every stage, accumulated the way the book's torch code does."""
    stages = [("stem", config.num_channels)]
    channels = config.num_channels
    for i, num_convs in enumerate(config.arch):
        channels += num_convs * config.growth_rate
        stages.append((f"dense{i + 1}", channels))
        if i != len(config.arch) - 1:
            channels = config.transition_channels(channels)
            if channels < 1:
                raise ConfigError(f"transition {i + 1} would compress the channels to zero")
            stages.append((f"transition{i + 1}", channels))
    stages.append(("head", config.num_classes))
    return stages


def _spatial_chain(config: DenseNetConfig, size: int) -> list[int]:
    """Spatial size after stem, each dense block and each transition (square side)."""
    size = _out(_out(size, STEM_CONV), STEM_POOL)
    sizes = [size]
    for i in range(len(config.arch)):
        sizes.append(size)
        if i != len(config.arch) - 1:
            size = _out(size, TRANSITION_POOL)
            sizes.append(size)
    return sizes


def min_input_size(config: DenseNetConfig) -> int:
    """The smallest image side the network can take (29 for four dense blocks)."""
    size = 1
    while min(_spatial_chain(config, size)) < 1:
        size += 1
    return size


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
    return hw  # type: ignore[return-value]


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
    h, w = _as_hw(input_size)
    hs, ws = _spatial_chain(config, h), _spatial_chain(config, w)
    channels = plan_channels(config)
    smallest = min_input_size(config)
    if min(hs) < 1 or min(ws) < 1:
        names = [name for name, _ in channels[:-1]]
        first_bad = next(n for n, a, b in zip(names, hs, ws) if a < 1 or b < 1)
        raise InputError(
            f"input {h}x{w} is too small for this network: the feature map would be empty after "
            f"{first_bad}; it has {len(config.arch)} dense blocks and needs at least "
            f"{smallest}x{smallest} (resize the images, e.g. Fashion-MNIST's 28x28 to 96x96)"
        )
    stages = [Stage(name, c, a, b) for (name, c), a, b in zip(channels[:-1], hs, ws)]
    stages.append(Stage("head", config.num_classes, 1, 1))
    return NetworkPlan(config, (h, w), tuple(stages))


def bn_counts(config: DenseNetConfig, input_size: int | tuple[int, int], batch: int) -> dict[str, int]:
    """Values each BatchNorm averages over (N*H*W), by canonical prefix: the n of n/(n-1)."""
    p = plan(config, input_size)
    h, w = p.input_size
    size = {s.name: s.height * s.width for s in p.stages}
    counts = {"stem": batch * _out(h, STEM_CONV) * _out(w, STEM_CONV)}
    for i, num_convs in enumerate(config.arch):
        for j in range(num_convs):
            counts[f"dense{i + 1}.conv{j + 1}"] = batch * size[f"dense{i + 1}"]
            if config.bn_size is not None:
                counts[f"dense{i + 1}.conv{j + 1}.bottleneck"] = batch * size[f"dense{i + 1}"]
        if i != len(config.arch) - 1:
            counts[f"transition{i + 1}"] = batch * size[f"dense{i + 1}"]
    counts["head"] = batch * size[f"dense{len(config.arch)}"]
    return counts


def count_params(config: DenseNetConfig) -> int:
    """Trainable parameters: conv kernels and biases, BN scale and shift, the dense layer."""
    return sum(_size(shape) for name, shape in canonical_spec(config).items() if not is_state(name))


def count_bn_stats(config: DenseNetConfig) -> int:
    """Running-statistic values (mean and variance of every BatchNorm), not trainable."""
    return sum(_size(shape) for name, shape in canonical_spec(config).items() if is_state(name))


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def count_macs(config: DenseNetConfig, input_size: int | tuple[int, int] = 96) -> int:
    """Multiply-adds of one forward pass for one image: every convolution and the dense layer."""
    h, w = _as_hw(input_size)
    hs, ws = _spatial_chain(config, h), _spatial_chain(config, w)
    total = config.in_channels * config.num_channels * 49 * _out(h, STEM_CONV) * _out(w, STEM_CONV)
    channels, k = config.num_channels, 1
    for i, num_convs in enumerate(config.arch):
        area = hs[k] * ws[k]
        for _ in range(num_convs):
            if config.bn_size is None:
                total += channels * config.growth_rate * 9 * area
            else:
                width = config.bn_size * config.growth_rate
                total += (channels * width + width * config.growth_rate * 9) * area
            channels += config.growth_rate
        if i != len(config.arch) - 1:
            total += channels * config.transition_channels(channels) * area
            channels = config.transition_channels(channels)
            k += 2
    return total + channels * config.num_classes


def canonical_spec(config: DenseNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the network by canonical name, with its shape in the canonical layout.

    Canonical layout: conv kernels OIHW, dense weight (out, in), BatchNorm vectors (C,).
    The order is the order of the forward pass, and every backend exports in this order.
    """
    spec: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cin: int, cout: int, k: int) -> None:
        spec[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        if config.conv_bias:
            spec[f"{prefix}.conv.bias"] = (cout,)

    def bn(prefix: str, c: int) -> None:
        for leaf in BN_LEAVES:
            spec[f"{prefix}.bn.{leaf}"] = (c,)

    conv("stem", config.in_channels, config.num_channels, STEM_CONV[0])
    bn("stem", config.num_channels)
    channels = config.num_channels
    for i, num_convs in enumerate(config.arch):
        for j in range(num_convs):
            prefix, cin = f"dense{i + 1}.conv{j + 1}", channels
            if config.bn_size is not None:
                bn(f"{prefix}.bottleneck", cin)
                cin = config.bn_size * config.growth_rate
                conv(f"{prefix}.bottleneck", channels, cin, 1)
            bn(prefix, cin)
            conv(prefix, cin, config.growth_rate, 3)
            channels += config.growth_rate
        if i != len(config.arch) - 1:
            bn(f"transition{i + 1}", channels)
            conv(f"transition{i + 1}", channels, config.transition_channels(channels), 1)
            channels = config.transition_channels(channels)
    bn("head", channels)
    spec["head.fc.weight"] = (config.num_classes, channels)
    spec["head.fc.bias"] = (config.num_classes,)
    return spec


def canonical_layers(config: DenseNetConfig) -> list[tuple[str, str]]:
    """Every layer that holds tensors, in forward order: ``(prefix, kind)`` with kind ``conv``,
    ``bn`` or ``fc``, e.g. ``("dense1.conv1.bottleneck.bn", "bn")``. Adapters list their own layers
    in the same order, and the canonical names follow from the pairing."""
    layers: list[tuple[str, str]] = []
    for name in canonical_spec(config):
        prefix = name.rsplit(".", 1)[0]
        if not layers or layers[-1][0] != prefix:
            layers.append((prefix, prefix.rsplit(".", 1)[-1]))
    return layers


# BatchNorm tensors: scale, shift (trainable) and the running statistics (state).
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
BN_STATE_LEAVES = ("running_mean", "running_var")


def is_state(name: str) -> bool:
    """True for running statistics, which are not trainable."""
    return name.rsplit(".", 1)[-1] in BN_STATE_LEAVES


# The book's network, as section 8.7 builds it.
D2L = DenseNetConfig()

# The DenseNet-BC family of the paper's Table 1 (ImageNet: 3 channels, 1000 classes).
_BC = {"bn_size": 4, "conv_bias": False, "num_classes": 1000, "in_channels": 3}
CONFIGS: dict[str, DenseNetConfig] = {
    "d2l": D2L,
    "densenet121": DenseNetConfig(64, 32, (6, 12, 24, 16), **_BC),
    "densenet161": DenseNetConfig(96, 48, (6, 12, 36, 24), **_BC),
    "densenet169": DenseNetConfig(64, 32, (6, 12, 32, 32), **_BC),
    "densenet201": DenseNetConfig(64, 32, (6, 12, 48, 32), **_BC),
    "densenet264": DenseNetConfig(64, 32, (6, 12, 64, 48), **_BC),
}


def named_config(name: str, **changes: Any) -> DenseNetConfig:
    """A named configuration (``d2l``, ``densenet121`` ...), optionally with fields changed."""
    try:
        config = CONFIGS[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown configuration {name!r}; expected one of {', '.join(CONFIGS)}") from None
    return config.replace(**changes) if changes else config
