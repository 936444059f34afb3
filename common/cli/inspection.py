"""``densenet list``, ``compare`` and ``summary``: what the backends are and what they build."""

from __future__ import annotations

import argparse
import json
import sys

from common.cli.options import (
    add_network_options,
    add_precision_option,
    backend_list,
    check_precision_args,
    config_from_args,
)
from common.limits import check_memory
from common.registry import BACKENDS, BackendStatus, available, installed
from common.render import format_table
from common.verify.harness import compare_shapes
from common.verify.summary import summarize

__all__ = ["add_compare", "add_list", "add_summary", "cmd_compare", "cmd_list", "cmd_summary"]


def _status_table(statuses: list[BackendStatus]) -> str:
    def state(s: BackendStatus) -> str:
        if not s.available:
            return f"no: {s.reason}"
        return "yes (imported)" if s.checked else "installed"

    rows = [(s.name, s.framework, s.version or "-", state(s)) for s in statuses]
    table = format_table(["backend", "framework", "version", "available"], rows)
    if not all(s.checked for s in statuses):
        table += "\n(from package metadata; --check imports each framework to be sure, which takes seconds)"
    return table


def cmd_list(args: argparse.Namespace) -> int:
    statuses = available() if args.check else installed()
    print(json.dumps([s.__dict__ for s in statuses], indent=2) if args.json else _status_table(statuses))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # before the backend names: a bad configuration is reported first
    backends = backend_list(args.backends)
    check_memory(config, args.input_size, args.batch_size, args.dtype)
    check_precision_args(args)
    report = compare_shapes(
        backends, config, args.input_size, args.batch_size, args.seed, dtype=args.dtype, precision=args.precision
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    if not report.ok and not args.json:
        print("FAILED:\n  " + "\n  ".join(report.failures), file=sys.stderr)
    return 0 if report.ok else 1


def cmd_summary(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_memory(config, args.input_size, args.batch_size)
    print(summarize(args.backend, config, args.input_size, args.batch_size, args.seed).to_text())
    return 0


def add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="backends, their framework versions, and why any is unavailable")
    p.add_argument("--check", action="store_true", help="import each framework instead of reading package metadata")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_list)


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="feed one seeded input to every backend and compare shapes stage by stage")
    p.add_argument(
        "--backends",
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: every installed one); "
        "a named backend that cannot load is a failure",
    )
    add_network_options(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="every weight and activation")
    add_precision_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compare)


def add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="layer-by-layer shape table of one backend (the book's layer_summary)")
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    add_network_options(p)
    p.set_defaults(func=cmd_summary)
