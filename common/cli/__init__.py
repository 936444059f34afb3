"""The ``densenet`` command (also ``python -m common``): the parser and ``main``.

Each command group lives in its own module (``inspection``, ``parity``, ``training``,
``weights``, ``teach``) and adds its subcommands here; ``options`` holds what they share. The commands only
orchestrate: the reports they print render themselves (``to_text()`` / ``to_dict()``).

Whatever goes wrong, a person sees one clear line on stderr and an exit status, never a
traceback: 2 when an argument or a named file cannot be used, 1 when the command ran and failed,
130 on Ctrl-C; SIGTERM and SIGHUP stop a command as Ctrl-C does, with 143 and 129 (128 + the
signal, common.process.lifeline). ``DENSENET_TRACEBACK=1`` shows the traceback of an unexpected error (a bug).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from importlib import metadata

from common.cli import bench, deploy, inspection, parity, teach, training, weights
from common.cli.options import HelpFormatter, add_threads_options
from common.errors import DenseNetError
from common.process import allocator, lifeline, threads
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
        epilog="Exit status: 0 success, 1 the command failed, 2 a bad argument or input file, 130 interrupted "
        "(143 by SIGTERM, 129 by SIGHUP).",
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
        deploy.add_export,
        teach.add_parsers,
    ):
        add(sub)
    add_threads_options(sub)  # on every command that computes
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
    # First of all: a process a launcher started (a worker, a benchmark case) dies with that
    # launcher (common.process.lifeline). Only as the program itself, never for a caller's main([...]).
    supervised = lifeline.guard_parent() if argv is None else False
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher re-runs in each worker
    # SIGTERM and SIGHUP stop a command as Ctrl-C does (the same message, then exit 128 + the
    # signal). A supervised process keeps SIGTERM's default, immediate end: its launcher asks it
    # to stop with SIGINT and uses SIGTERM to end it at once, even inside a framework's C++ call.
    with lifeline.interrupts((signal.SIGINT,) if supervised else lifeline.INTERRUPTS):
        code = _run(args, argv)
        signum = lifeline.interrupted()
    return lifeline.exit_status(signum) if code == 130 and signum is not None else code


def _say(message: str) -> None:
    """One line on stderr; a terminal that hung up (SIGHUP) cannot take it, which changes nothing."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    name = f"densenet {args.command}"
    try:
        if getattr(args, "apply_threads", False) and (argv is None or args.threads is not None):
            # Before any framework is imported (common.process.threads); a caller's main([...])
            # without --threads leaves its process's pools alone.
            threads.apply(args.threads)
        one_process = getattr(args, "workers", 1) == 1 and not getattr(args, "distributed", False)
        # Aliases included ("pytorch", "gluon"): the process is chosen by the backend it will load.
        named = args.command in ("train", "evaluate") and args.backend is not None
        backend = canonical_name(args.backend) if named else None
        if argv is None and backend is not None and one_process and allocator.wanted(backend) == "tcmalloc":
            # Only as the program itself (a caller's main([...]) is never replaced), and never for
            # distributed runs: a gloo worker on TCMalloc sometimes aborted at exit.
            allocator.relaunch_on_tcmalloc(sys.orig_argv[1:])
        if argv is None and args.command == "train":
            # Before MXNet is imported, which reads its engine once (common.process.allocator);
            # a memory-efficient run is always one process.
            os.environ.update(allocator.mxnet_engine_env(os.environ, backend, args.memory_efficient))
        return args.func(args)
    except DenseNetError as exc:
        _say(f"{name}: error: {exc}" if exc.exit_status != 130 else f"{name}: {exc}")
        return exc.exit_status
    except KeyboardInterrupt as exc:
        _say(f"{name}: interrupted ({lifeline.describe(getattr(exc, 'signum', signal.SIGINT))})")
        return 130
    except MemoryError:
        _say(f"{name}: error: out of memory; use a smaller --batch-size or image size")
        return 1
    except OSError as exc:
        _say(f"{name}: error: {_os_error(exc)}")
        return 1
    except Exception as exc:  # a bug, or a framework failing in a way we do not know yet
        signum = lifeline.interrupted()
        if signum is not None:
            # The KeyboardInterrupt a signal raised inside a framework's own code, which turned it
            # into another exception (TensorFlow's pybind11: "MISMATCH of original and normalized
            # active exception types"): an interrupt, not a bug.
            _say(f"{name}: interrupted ({lifeline.describe(signum)})")
            return 130
        if os.environ.get("DENSENET_TRACEBACK"):
            raise
        _say(f"{name}: internal error: {_one_line(exc)} (DENSENET_TRACEBACK=1 shows where; please report it)")
        return 1
