"""Options and argument types that several ``densenet`` commands share.

Every type here is strict: a value either means exactly one thing or is a usage error (exit 2).
``4,,4`` is not ``4,4``, ``64x`` is not ``64x64`` and ``,`` is not "every backend".
"""

from __future__ import annotations

import argparse
import math
import re

from common.config import CONFIGS, DenseNetConfig, named_config
from common.errors import BackendError, DenseNetError
from common.process import threads
from common.registry import canonical_name

__all__ = [
    "MAX_SEED",
    "HelpFormatter",
    "add_config_options",
    "add_network_options",
    "add_threads_options",
    "backend_list",
    "backend_names",
    "config_from_args",
    "config_options_given",
    "fraction",
    "on_off_list",
    "positive_float",
    "positive_int",
    "positive_int_list",
    "seed",
    "seed_range",
]

# Every framework's seeding takes an unsigned 32-bit integer (numpy's legacy seeding, MXNet, TF).
MAX_SEED = 2**32 - 1


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default where it has a meaningful one (not None or off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or isinstance(action, argparse._StoreTrueAction)
        ):
            return text
        shown = default
        if isinstance(default, (list, tuple)):
            shown = "x".join(map(str, default)) if action.dest == "input_size" else ",".join(map(str, default))
        return f"{text} (default: {shown})".strip().replace("%", "%%")


def _int(text: str, what: str) -> int:
    if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = _int(text, "an integer of 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above zero (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a share of the data)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed, 0 to 2**32 - 1 (what every framework's seeding accepts)."""
    value = _int(text, "a seed (an integer from 0 to 4294967295)")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {MAX_SEED}, got {value}")
    return value


def _items(text: str, what: str) -> list[str]:
    """Comma-separated items, each non-empty (``4,,4`` and ``4,`` are refused, not repaired)."""
    items = [v.strip() for v in text.split(",")]
    if not text.strip() or any(not v for v in items):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} (an empty item)")
    return items


def _arch(text: str) -> tuple[int, ...]:
    what = "comma-separated positive ints like 4,4,4,4"
    inner = text.strip()
    if inner.startswith("(") and inner.endswith(")"):
        inner = inner[1:-1]
    if not inner.strip():
        return ()  # the configuration says why an empty arch is impossible
    items = _items(inner, what)
    if not all(re.fullmatch(r"\d+", v) for v in items):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return tuple(int(v) for v in items)


def _input_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?", text.lower())
    if not m or min(int(v) for v in m.groups() if v is not None) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 96 or 96x64, got {text!r}")
    height = int(m[1])
    return height, int(m[2]) if m[2] is not None else height


def seed_range(text: str) -> list[int]:
    """``0-15`` or ``0,3,7``: a list of seeds (0 to 2**32 - 1)."""
    what = "seeds like 0-15 or 0,3,7"
    if m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text):
        first, last = int(m[1]), int(m[2])
        if last < first:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} (an empty range)")
        seeds = list(range(first, last + 1))
    else:
        items = _items(text, what)
        if not all(re.fullmatch(r"\d+", v) for v in items):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        seeds = [int(v) for v in items]
    if max(seeds) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds go up to {MAX_SEED}, got {max(seeds)}")
    return seeds


def positive_int_list(text: str) -> list[int]:
    """``1,2``: positive ints."""
    return [positive_int(v) for v in _items(text, "comma-separated positive integers like 1,2")]


def on_off_list(text: str) -> list[bool]:
    """``on``, ``off`` or ``on,off``."""
    values = [v.lower() for v in _items(text, "on, off or on,off")]
    if any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"expected on, off or on,off, got {text!r}")
    return [v == "on" for v in values]


def _optional_int(text: str) -> int | str:
    # "none" stays a string here: None already means "option not given".
    if text.strip().lower() == "none":
        return "none"
    return _int(text, "an integer or 'none'")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _config_int(text: str) -> int:
    # Range checks belong to DenseNetConfig, whose message names the field.
    return _int(text, "an integer")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# option -> (configuration field, argparse type, help). Every option defaults to None, which
# config_from_args reads as "not given: keep the field of --config (or of the command's default)".
_CONFIG_OPTIONS = {
    "--num-channels": ("num_channels", _config_int, "stem output channels"),
    "--growth-rate": ("growth_rate", _config_int, "channels each conv block adds"),
    "--arch": ("arch", _arch, "convs per dense block, e.g. 4,4,4,4"),
    "--num-classes": ("num_classes", _config_int, "classes the head predicts"),
    "--in-channels": ("in_channels", _config_int, "image channels"),
    "--bn-size": ("bn_size", _optional_int, "DenseNet-BC bottleneck width factor ('none': the book's block)"),
    "--compression": ("compression", _float, "fraction of channels a transition keeps"),
    "--drop-rate": ("drop_rate", _float, "dropout after each dense layer"),
    "--conv-bias": ("conv_bias", _bool, "whether convolutions have a bias (true/false)"),
}


def add_config_options(
    p: argparse.ArgumentParser, default: str = "d2l", title: str | None = None
) -> argparse._ArgumentGroup:
    """``--config NAME`` and the configuration's fields as options (each overrides the named
    configuration); read back with :func:`config_from_args`."""
    g = p.add_argument_group(title or f"network (default: {default})")
    g.add_argument("--config", help=f"named configuration: {', '.join(CONFIGS)}")
    for option, (field, parse, text) in _CONFIG_OPTIONS.items():
        g.add_argument(option, dest=field, type=parse, default=None, help=text)
    return g


def add_network_options(p: argparse.ArgumentParser, default: str = "d2l") -> None:
    """The configuration options plus the seeded input batch: ``--input-size``, ``--batch-size``, ``--seed``."""
    g = add_config_options(p, default)
    g.add_argument("--input-size", type=_input_size, default=(96, 96), help="image side, or HxW")
    g.add_argument("--batch-size", type=positive_int, default=1, help="images in the seeded batch")
    g.add_argument("--seed", type=seed, default=0, help="seed of the weights and the input")


def config_options_given(args: argparse.Namespace) -> bool:
    """Whether ``--config`` or any field option was given."""
    return bool(args.config) or any(getattr(args, field) is not None for field, _, _ in _CONFIG_OPTIONS.values())


def config_from_args(args: argparse.Namespace, default: DenseNetConfig | None = None) -> DenseNetConfig:
    """The named configuration (``--config``, else ``default``, else d2l) with any field options applied."""
    base = named_config(args.config) if args.config else (default or DenseNetConfig())
    changes = {
        field: None if value == "none" else value
        for field, _, _ in _CONFIG_OPTIONS.values()
        if (value := getattr(args, field)) is not None
    }
    return base.replace(**changes) if changes else base


def backend_names(text: str) -> list[str]:
    """``torch,tf``: canonical names, each once; unknown, empty or repeated names are refused."""
    if not text.strip():
        raise BackendError("no backend named (an empty --backends)")
    items = [v.strip() for v in text.split(",")]
    if any(not v for v in items):
        raise BackendError(f"expected comma-separated backend names like torch,tf, got {text!r} (an empty item)")
    names = [canonical_name(v) for v in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BackendError(f"backend {', '.join(repeated)} named twice in {text!r}")
    return names


def backend_list(text: str | None) -> list[str] | None:
    """``--backends a,b``: canonical names, or None (every backend) when absent or ``all``."""
    if text is None or text.strip().lower() == "all":
        return None
    return backend_names(text)


# The commands that compute with a framework or numpy, each taking --threads
# (common.process.threads); an exercise is named with its command. `parity-sweep --threads 1,2`
# is its own: the counts to sweep, each setting a process set up with the same table.
THREADED = (
    *(
        "compare",
        "summary",
        "parity",
        "train",
        "evaluate",
        "data-speed",
        "bench",
        "golden",
        "convert",
        "teach",
        "export",
    ),
    *("exercise pooling", "exercise memory", "exercise dense-mlp"),
)


def _subcommand(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def add_precision_option(p: argparse.ArgumentParser, what: str = "runs") -> None:
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help=f"bfloat16: mixed precision, each framework's own (bfloat16 compute, float32 weights, BatchNorm "
        f"statistics and loss; docs/precision.md); the network {what} in float32 by default",
    )


def check_precision_args(args: argparse.Namespace) -> None:
    """``--precision bfloat16`` keeps float32 weights: refuse it beside another ``--dtype``."""
    dtype = getattr(args, "dtype", "float32")
    if args.precision != "float32" and dtype != "float32":
        raise DenseNetError(f"--precision {args.precision} keeps float32 weights; it cannot go with --dtype {dtype}")


def add_threads_options(sub: argparse._SubParsersAction) -> None:
    """``--threads N`` on every command of :data:`THREADED`; ``apply_threads`` tells ``main`` to
    set the count up before the command runs."""
    for path in THREADED:
        first, *rest = path.split()
        p = sub.choices[first]
        for name in rest:
            p = _subcommand(p, name)
        p.add_argument(
            "--threads",
            type=threads.thread_count,
            metavar="N",
            help=f"threads every framework computes with, set before any loads (default: ${threads.ENV}, else "
            "$OMP_NUM_THREADS, else the cores this process may run on)",
        )
        p.set_defaults(apply_threads=True)
