"""The ``densenet`` command (also ``python -m common``): the parser and ``main``.

Each command group lives in its own module (``inspection``, ``parity``, ``training``,
``weights``, ``teach``) and adds its subcommands here; ``options`` holds what they share. The commands only
orchestrate: the reports they print render themselves (``to_text()`` / ``to_dict()``).

Whatever goes wrong, a person sees one clear line on stderr and an exit status, never a
traceback: 2 when an argument or a named file cannot be used, 1 when the command ran and failed,
130 on Ctrl-C. ``DENSENET_TRACEBACK=1`` shows the traceback of an unexpected error (a bug).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from common.bench import allocator
from common.cli import bench, inspection, parity, teach, training, weights
from common.cli.options import HelpFormatter
from common.errors import DenseNetError
from common.registry import canonical_name

__all__ = ["build_parser", "main", "version"]


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser shows the options' defaults in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    """The installed distribution's version, from its metadata (no framework is imported)."""
    try:
        return metadata.version("densenet-suite")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; run from a source tree)"


def build_parser() -> argparse.ArgumentParser:
    """The ``densenet`` parser with every subcommand; each sets ``func`` to the command to run."""
    parser = _Parser(
        prog="densenet",
        description="The d2l DenseNet in PyTorch, MXNet, JAX/Flax and TensorFlow, side by side.",
        epilog="Exit status: 0 success, 1 the command failed, 2 a bad argument or input file, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"densenet-suite {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
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
        bench.add_bench,
        parity.add_golden,
        weights.add_parsers,
        teach.add_parsers,
    ):
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The telling line of a foreign exception's message (MXNet's start with a C++ stack)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    plain = [line for line in lines if not line.startswith(("Traceback", "File ", "[bt]", "Stack trace"))]
    if not plain:
        return type(exc).__name__
    text = plain[-1] if lines[0].startswith("Traceback") else plain[0]
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors are printed as one line on stderr and become the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher re-runs in each worker
    name = f"densenet {args.command}"
    try:
        one_process = getattr(args, "workers", 1) == 1 and not getattr(args, "distributed", False)
        # Aliases included ("pytorch", "gluon"): the process is chosen by the backend it will load.
        backend = canonical_name(args.backend) if args.command in ("train", "evaluate") else None
        if argv is None and backend == "torch" and one_process:
            # Only as the program itself (a caller's main([...]) is never replaced), and never for
            # distributed runs: a gloo worker on TCMalloc sometimes aborted at exit.
            allocator.relaunch_on_tcmalloc(sys.orig_argv[1:])
        if argv is None and args.command == "train":
            # Before MXNet is imported, which reads its engine once (common.bench.allocator);
            # a memory-efficient run is always one process.
            os.environ.update(allocator.mxnet_engine_env(os.environ, backend, args.memory_efficient))
        return args.func(args)
    except DenseNetError as exc:
        print(f"{name}: error: {exc}" if exc.exit_status != 130 else f"{name}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{name}: error: out of memory; use a smaller --batch-size or image size", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{name}: error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a framework failing in a way we do not know yet
        if os.environ.get("DENSENET_TRACEBACK"):
            raise
        print(
            f"{name}: internal error: {_one_line(exc)} (DENSENET_TRACEBACK=1 shows where; please report it)",
            file=sys.stderr,
        )
        return 1
