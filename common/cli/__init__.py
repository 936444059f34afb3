"""The ``densenet`` command (also ``python -m common``): the parser and ``main``.

Each command group lives in its own module (``inspection``, ``parity``, ``training``,
``weights``, ``teach``) and adds its subcommands here; ``options`` holds what they share. The commands only
orchestrate: the reports they print render themselves (``to_text()`` / ``to_dict()``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.cli import inspection, parity, teach, training, weights
from common.errors import DenseNetError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``densenet`` parser with every subcommand; each sets ``func`` to the command to run."""
    parser = argparse.ArgumentParser(
        prog="densenet",
        description="The d2l DenseNet in PyTorch, MXNet, JAX/Flax and TensorFlow, side by side.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `densenet --help` lists them, which is not module by module.
    for add in (
        inspection.add_list,
        inspection.add_compare,
        inspection.add_summary,
        parity.add_parity,
        parity.add_parity_sweep,
        training.add_train,
        training.add_evaluate,
        training.add_data_speed,
        training.add_plot,
        parity.add_golden,
        weights.add_parsers,
        teach.add_parsers,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors meant for people are printed (exit status 2), not raised."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DenseNetError as exc:
        print(f"densenet {args.command}: error: {exc}", file=sys.stderr)
        return 2
