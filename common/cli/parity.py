"""``densenet parity`` and ``golden``: the backends against each other and the numpy oracle."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from common import golden
from common.cli.options import add_network_options, backend_list, config_from_args, positive_int
from common.parity import PARITY_CASE, NaiveRow, ParityReport, run_naive, run_parity
from common.render import format_table

__all__ = ["add_golden", "add_parity", "cmd_golden", "cmd_parity"]


def _parity_text(report: ParityReport, naive: list[NaiveRow]) -> str:
    """The parity tables for people, ending with the verdict when every check passes.

    This belongs on ``ParityReport`` as ``to_text()``; it waits here while common/parity.py is
    being rewritten, so that both changes do not edit that module at once."""
    h, w = report.input_size
    config = report.config
    rows = [
        [
            c.check,
            f"{c.a} vs {c.b}",
            f"{c.max_abs:.2e}",
            f"{c.max_rel:.2e}",
            c.worst,
            str(c.tolerance),
            "pass" if c.passed else "FAIL",
        ]
        for c in report.comparisons
    ]
    lines = [
        f"DenseNet {config.describe()}; input {report.batch}x{config.in_channels}x{h}x{w}, seed {report.seed}",
        f"identical canonical weights in: {', '.join(report.participants)} (numpy = common.reference, float64)",
        "",
        format_table(["check", "pair", "max abs", "max rel", "worst tensor", "tolerance", "result"], rows),
    ]
    if naive:
        rows = [[r.default, r.frameworks, r.affects, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}"] for r in naive]
        lines += [
            "",
            "with each framework's default instead (numpy oracle, same weights and input):",
            format_table(["default", "frameworks", "changes", "max abs", "max rel"], rows),
        ]
    if report.ok:
        lines += ["", f"OK: {len(report.comparisons)} comparisons within tolerance"]
    return "\n".join(lines)


def cmd_parity(args: argparse.Namespace) -> int:
    config = config_from_args(args, default=PARITY_CASE)
    report = run_parity(
        backend_list(args.backends),
        config,
        args.input_size,
        args.batch_size,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        progress=None if args.json else lambda message: print(f"  {message}", file=sys.stderr),
    )
    naive = run_naive(config, args.input_size, args.batch_size, args.seed) if args.naive else []
    if args.json:
        print(json.dumps({**report.to_dict(), "naive": [asdict(r) for r in naive]}, indent=2))
        return 0 if report.ok else 1
    print(_parity_text(report, naive))
    for name, error in report.errors.items():
        print(f"{name}: {error}", file=sys.stderr)
    if report.ok:
        return 0
    failed = sum(not c.passed for c in report.comparisons)
    print(
        f"\nFAILED: {failed} comparison(s) out of tolerance, {len(report.errors)} backend error(s)",
        file=sys.stderr,
    )
    return 1


def cmd_golden(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else None
    if args.check:
        problems = golden.drift(directory)
        if problems:
            print("golden vectors drifted:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"OK: {len(golden.CASES)} golden case(s) match the numpy oracle")
        return 0
    for path in golden.write(directory):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="identical weights and inputs in every backend: compare forward, gradients, SGD steps",
        description="Defaults: the parity case, DenseNetConfig(16, 16, (2, 2)) on 8x1x32x32. For the book's "
        "network add --config d2l (its lockstep losses diverge: docs/parity.md).",
    )
    p.add_argument("--backends", help="comma-separated subset (default: every installed one)")
    add_network_options(p, default="the parity case, DenseNetConfig(16, 16, (2, 2))")
    p.set_defaults(input_size=(32, 32), batch_size=8)
    p.add_argument("--steps", type=positive_int, default=20, help="lockstep SGD steps")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--naive", action="store_true", help="also show what each framework's default settings would change")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_parity)


def add_golden(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("golden", help="regenerate (or --check) the golden vectors in common/golden")
    p.add_argument("--check", action="store_true", help="compare with a fresh computation instead of writing")
    p.add_argument("--dir", help="directory of the files (default: common/golden in the package)")
    p.set_defaults(func=cmd_golden)
