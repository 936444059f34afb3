"""Options and argument types that several ``densenet`` commands share."""

from __future__ import annotations

import argparse

from common.config import CONFIGS, DenseNetConfig, named_config
from common.registry import canonical_name

__all__ = [
    "add_config_options",
    "add_network_options",
    "backend_list",
    "config_from_args",
    "on_off_list",
    "positive_int",
    "positive_int_list",
    "seed_range",
]


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _arch(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").strip("()").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 4,4,4,4, got {text!r}") from None


def _input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 96 or 96x64, got {text!r}")
    return values[0], values[1]


def seed_range(text: str) -> list[int]:
    """``0-15`` or ``0,3,7``: a list of non-negative seeds."""
    try:
        if "-" in text.strip("-"):
            first, last = (int(v) for v in text.split("-", 1))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected seeds like 0-15 or 0,3,7, got {text!r}")
    return seeds


def positive_int_list(text: str) -> list[int]:
    """``1,2``: positive ints."""
    return [positive_int(v) for v in text.split(",") if v.strip()]


def on_off_list(text: str) -> list[bool]:
    """``on``, ``off`` or ``on,off``."""
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"expected on, off or on,off, got {text!r}")
    return [v == "on" for v in values]


def _optional_int(text: str) -> int | str:
    # "none" stays a string here: None already means "option not given". A bad value's usage
    # error names this function ("invalid _optional_int value"), so renaming it changes output.
    return "none" if text.lower() == "none" else int(text)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# option -> (configuration field, argparse type, help). Every option defaults to None, which
# config_from_args reads as "not given: keep the field of --config (or of the command's default)".
_CONFIG_OPTIONS = {
    "--num-channels": ("num_channels", int, "stem output channels"),
    "--growth-rate": ("growth_rate", int, "channels each conv block adds"),
    "--arch": ("arch", _arch, "convs per dense block, e.g. 4,4,4,4"),
    "--num-classes": ("num_classes", int, None),
    "--in-channels": ("in_channels", int, "image channels"),
    "--bn-size": ("bn_size", _optional_int, "DenseNet-BC bottleneck width factor ('none': the book's block)"),
    "--compression": ("compression", float, "fraction of channels a transition keeps"),
    "--drop-rate": ("drop_rate", float, "dropout after each dense layer"),
    "--conv-bias": ("conv_bias", _bool, "whether convolutions have a bias (true/false)"),
}


def add_config_options(p: argparse.ArgumentParser, default: str = "d2l") -> argparse._ArgumentGroup:
    """``--config NAME`` and the configuration's fields as options (each overrides the named
    configuration); read back with :func:`config_from_args`."""
    g = p.add_argument_group(f"network (default: {default})")
    g.add_argument("--config", help=f"named configuration: {', '.join(CONFIGS)}")
    for option, (field, parse, text) in _CONFIG_OPTIONS.items():
        g.add_argument(option, dest=field, type=parse, default=None, help=text)
    return g


def add_network_options(p: argparse.ArgumentParser, default: str = "d2l") -> None:
    """The configuration options plus the seeded input batch: ``--input-size``, ``--batch-size``, ``--seed``."""
    g = add_config_options(p, default)
    g.add_argument("--input-size", type=_input_size, default=(96, 96), help="image side, or HxW")
    g.add_argument("--batch-size", type=positive_int, default=1)
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace, default: DenseNetConfig | None = None) -> DenseNetConfig:
    """The named configuration (``--config``, else ``default``, else d2l) with any field options applied."""
    base = named_config(args.config) if args.config else (default or DenseNetConfig())
    changes = {
        field: None if value == "none" else value
        for field, _, _ in _CONFIG_OPTIONS.values()
        if (value := getattr(args, field)) is not None
    }
    return base.replace(**changes) if changes else base


def backend_list(text: str | None) -> list[str] | None:
    """``--backends a,b``: canonical names, or None (every backend) when absent or ``all``."""
    if not text or text == "all":
        return None
    return [canonical_name(b) for b in text.split(",") if b.strip()]
