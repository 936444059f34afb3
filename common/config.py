"""The DenseNet configuration, the BatchNorm conventions and the named configurations.

The arithmetic that follows from a configuration (stage plan, canonical tensors, counts) lives in
:mod:`common.arch`, walked once, and is imported from there. Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.arch import (
    walk,
)
from common.errors import ConfigError

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "CONFIGS",
    "D2L",
    "DenseNetConfig",
    "named_config",
]

# BatchNorm conventions every backend is configured with, so they compute the same function.
# The frameworks' own defaults differ (see docs/parity.md); these are PyTorch's and MXNet's.
BN_EPS = 1e-5
# Weight of the *new* batch statistic in the running average (PyTorch's meaning of "momentum").
# MXNet, Keras and Flax use the complementary weight of the old value: 1 - BN_MOMENTUM.
BN_MOMENTUM = 0.1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class DenseNetConfig:
    """The book's ``DenseNet(num_channels=64, growth_rate=32, arch=(4, 4, 4, 4), num_classes=10)``.

    Keyword-only: the book's constructor orders its arguments differently, so a position would
    mean different things in the two. ``in_channels`` is the number of image channels (1 for
    Fashion-MNIST), which the book's constructor does not take: its first layer infers them.
    """

    num_channels: int = 64
    growth_rate: int = 32
    arch: tuple[int, ...] = (4, 4, 4, 4)
    num_classes: int = 10
    in_channels: int = 1
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
        if self.bn_size is not None and (not _is_int(self.bn_size) or self.bn_size < 1):
            raise ConfigError(f"bn_size must be a positive int or None (no bottleneck), got {self.bn_size!r}")
        if not _is_number(self.compression) or not 0 < self.compression <= 1:
            raise ConfigError(f"compression must be in (0, 1], got {self.compression!r}")
        if not _is_number(self.drop_rate) or not 0 <= self.drop_rate < 1:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not isinstance(self.conv_bias, bool):
            raise ConfigError(f"conv_bias must be True or False, got {self.conv_bias!r}")
        # Compression must leave at least one channel for every transition.
        walk(self)

    def book_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the backends' book-shaped constructor,
        ``DenseNet(num_channels=..., growth_rate=..., arch=..., num_classes=..., bn_size=..., ...)``:
        every field but ``in_channels``, which that constructor does not take."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "in_channels"}

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
        """The configuration of :meth:`to_dict`'s output (missing keys take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)


# The book's network, as section 8.7 builds it.
D2L = DenseNetConfig()

# The DenseNet-BC family of the paper's Table 1 (ImageNet: 3 channels, 1000 classes).
_BC = {"bn_size": 4, "conv_bias": False, "num_classes": 1000, "in_channels": 3}
CONFIGS: dict[str, DenseNetConfig] = {
    "d2l": D2L,
    "densenet121": DenseNetConfig(num_channels=64, growth_rate=32, arch=(6, 12, 24, 16), **_BC),
    "densenet161": DenseNetConfig(num_channels=96, growth_rate=48, arch=(6, 12, 36, 24), **_BC),
    "densenet169": DenseNetConfig(num_channels=64, growth_rate=32, arch=(6, 12, 32, 32), **_BC),
    "densenet201": DenseNetConfig(num_channels=64, growth_rate=32, arch=(6, 12, 48, 32), **_BC),
    "densenet264": DenseNetConfig(num_channels=64, growth_rate=32, arch=(6, 12, 64, 48), **_BC),
}


def named_config(name: str, **changes: Any) -> DenseNetConfig:
    """A named configuration (``d2l``, ``densenet121`` ...), optionally with fields changed."""
    try:
        config = CONFIGS[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown configuration {name!r}; expected one of {', '.join(CONFIGS)}") from None
    return config.replace(**changes) if changes else config
