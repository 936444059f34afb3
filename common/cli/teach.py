"""``densenet teach``, ``notebooks`` and ``exercise``: teaching material generated from the code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli.options import positive_int

__all__ = ["add_notebooks", "add_parsers", "add_teach", "cmd_notebooks", "cmd_teach"]

# Results files the site reads by default when they exist (docs/results/README.md says how
# each is produced).
DEFAULT_PARITY = ("parity_float32.json", "parity_float64.json")
DEFAULT_BENCHMARK = ("benchmark.json", "memory_224.json")


def cmd_teach(args: argparse.Namespace) -> int:
    from common.teach.facts import measure_backends
    from common.teach.page import SiteOptions, build_site, repo_root

    def say(message: str) -> None:
        if not args.quiet:
            print(f"  {message}", file=sys.stderr)

    docs = Path(args.docs) if args.docs else repo_root() / "docs"
    results = docs / "results"
    parity = [Path(p) for p in args.parity] if args.parity else [results / n for n in DEFAULT_PARITY]
    parity = [p for p in parity if p.is_file() or args.parity]  # named files must exist: read_parity says so
    benchmark = (
        Path(args.benchmark)
        if args.benchmark
        else next((results / n for n in DEFAULT_BENCHMARK if (results / n).is_file()), None)
    )
    options = SiteOptions(input_size=args.input_size, docs=docs, parity=[] if args.run_parity else parity)
    options.benchmark = benchmark
    if args.run_parity:
        from common.parity import run_parity

        for dtype in ("float32", "float64"):
            say(f"parity in {dtype} (about a minute)")
            options.parity_reports.append(run_parity(dtype=dtype).to_dict())
    if args.measure:
        options.measured = measure_backends(options.config, args.input_size, progress=say)
    index = build_site(args.out, options, progress=say)
    print(f"wrote {index} (open it from disk; it needs no server)")
    return 0


def add_teach(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "teach",
        help="write the side-by-side site: the four implementations row by row, generated from the code",
        description="Writes DIR/index.html with its stylesheet, script and images: every code cell is the current "
        "source of its object (read with ast), next to what differs and the measured facts of this checkout. "
        "Works offline. See docs/teach.md.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if needed)")
    p.add_argument("--input-size", type=positive_int, default=96, help="image side of the stage table (default 96)")
    p.add_argument("--docs", metavar="DIR", help="the docs directory (default: docs/ of this checkout)")
    p.add_argument(
        "--parity",
        action="append",
        metavar="FILE",
        help="output of `densenet parity --json` to show (repeatable; default: docs/results/parity_*.json)",
    )
    p.add_argument("--run-parity", action="store_true", help="run the parity suite, float32 and float64, instead")
    p.add_argument("--benchmark", metavar="FILE", help="results file to chart (default: docs/results/ if present)")
    p.add_argument(
        "--measure", action="store_true", help="also build every installed backend: shapes and parameters per stage"
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_teach)


def cmd_notebooks(args: argparse.Namespace) -> int:
    from common.teach.notebooks import notebook_paths, sync
    from common.teach.page import repo_root

    directory = Path(args.dir) if args.dir else repo_root() / "notebooks"
    if not notebook_paths(directory):
        print(f"densenet notebooks: no densenet_*.py in {directory}", file=sys.stderr)
        return 2
    stale = sync(directory, check=args.check)
    if args.check:
        for path in stale:
            print(f"{path} differs from its script: run `densenet notebooks`", file=sys.stderr)
        return 1 if stale else 0
    print("\n".join(f"wrote {p}" for p in stale) or "every notebook already matches its script")
    return 0


def add_notebooks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "notebooks",
        help="write notebooks/densenet_<backend>.ipynb from their percent scripts (--check: compare only)",
    )
    p.add_argument("--dir", help="directory of the scripts (default: notebooks/ of this checkout)")
    p.add_argument("--check", action="store_true", help="exit 1 if a notebook differs from its script")
    p.set_defaults(func=cmd_notebooks)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``teach``, ``notebooks`` and ``exercise``."""
    add_teach(sub)
    add_notebooks(sub)
