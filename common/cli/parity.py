"""``densenet parity`` and ``golden``: the backends against each other and the numpy oracle."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from common import resources
from common.cli.options import (
    add_network_options,
    add_precision_option,
    backend_list,
    check_precision_args,
    config_from_args,
    on_off_list,
    positive_float,
    positive_int,
    positive_int_list,
    seed_range,
)
from common.errors import DenseNetError
from common.limits import check_memory
from common.oracle import golden
from common.render import format_table
from common.verify.parity import PARITY_CASE, run_naive, run_parity, run_sweep, summarize, sweep_markdown

__all__ = ["add_golden", "add_parity", "add_parity_sweep", "cmd_golden", "cmd_parity", "cmd_parity_sweep"]


def cmd_parity(args: argparse.Namespace) -> int:
    config = config_from_args(args, default=PARITY_CASE)
    backends = backend_list(args.backends)
    check_precision_args(args)
    check_memory(config, args.input_size, args.batch_size, args.dtype)
    say = None if args.json else (lambda message: print(f"  {message}", file=sys.stderr))
    seeds = args.seeds or [args.seed]
    reports = [
        run_parity(
            backends,
            config,
            args.input_size,
            args.batch_size,
            steps=args.steps,
            lr=args.lr,
            seed=seed,
            progress=say,
            dtype=args.dtype,
            precision=args.precision,
        )
        for seed in seeds
    ]
    backends_run = [n for n in reports[0].participants if n != "numpy" and n not in reports[0].errors]
    naive = run_naive(config, args.input_size, args.batch_size, args.seed, backends_run) if args.naive else []
    ok = all(r.ok for r in reports)
    if args.json:
        out = reports[0].to_dict() if len(reports) == 1 else {"seeds": seeds, "reports": [r.to_dict() for r in reports]}
        if len(reports) > 1:
            out.update(summary=summarize(reports), ok=ok)
        print(json.dumps({**out, "naive": [asdict(r) for r in naive]}, indent=2))
        return 0 if ok else 1
    for report in reports:
        print(report.to_text() + "\n")
    if len(reports) > 1:
        rows = [
            [check, f"{s['error']:.2e}", f"{s['bound']:.2e}", f"{s['margin']:.1f}x", s["where"]]
            for check, s in summarize(reports).items()
        ]
        print(f"worst over seeds {','.join(map(str, seeds))} ({len(seeds)} runs):")
        print(format_table(["check", "error", "bound", "margin", "where"], rows))
    if naive:
        print("\nwith each framework's default instead (numpy oracle, same weights and input):")
        rows = [[r.default, r.frameworks, r.affects, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}"] for r in naive]
        print(format_table(["default", "frameworks", "changes", "max abs", "max rel"], rows))
    if not ok:
        print("FAILED: a comparison out of its bound or a backend error (see above)", file=sys.stderr)
    return 0 if ok else 1


def _check_parity_args(forwarded: list[str]) -> None:
    """Refuse options `densenet parity` would refuse before starting a process per setting."""
    checker = argparse.ArgumentParser(prog="densenet parity-sweep, forwarding to densenet")
    add_parity(checker.add_subparsers(dest="command", required=True))
    args = checker.parse_args(["parity", *forwarded])
    if "--seeds" in forwarded or "--json" in forwarded:
        checker.error("--seeds and --json are parity-sweep's own: give --seeds before --")
    config = config_from_args(args, default=PARITY_CASE)
    backend_list(args.backends)
    check_memory(config, args.input_size, args.batch_size, args.dtype)


def cmd_parity_sweep(args: argparse.Namespace) -> int:
    forwarded = [a for a in (args.parity_args or []) if a != "--"]
    _check_parity_args(forwarded)
    rows, failures = run_sweep(
        forwarded,
        args.seeds,
        args.threads,
        args.onednn,
        progress=lambda message: print(f"  {message}", file=sys.stderr),
    )
    seeds = ",".join(map(str, args.seeds))
    command = " ".join(["densenet parity", *forwarded, "--seeds", seeds])
    print(f"worst over seeds {seeds}, every backend and pair: `{command}`\n")
    print(sweep_markdown(rows))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures or not rows else 0


def cmd_golden(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else None
    if directory is not None and directory.exists() and not directory.is_dir():
        raise DenseNetError(f"--dir {directory} is a file, not a directory")
    if directory is not None and args.check and not directory.is_dir():
        raise DenseNetError(f"--dir {directory} does not exist: nothing to check")
    if args.check:
        problems = golden.drift(directory)
        if problems:
            print("golden vectors drifted:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"OK: {len(golden.CASES)} golden case(s) match the numpy oracle")
        return 0
    if directory is None and resources.checkout_root() is None:
        raise DenseNetError(
            "regenerating rewrites the vectors committed in a source checkout and this suite is "
            "an installed package; `--check` compares against the shipped ones, or name a directory with --dir"
        )
    for path in golden.write(directory):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="identical weights and inputs in every backend: compare forward, gradients, SGD steps",
        description="Defaults: the parity case, DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2)) on "
        "8x1x32x32, float32. For the book's network add --config d2l --input-size 96; --dtype float64 for the proof "
        "(docs/parity.md).",
    )
    p.add_argument("--backends", help="comma-separated subset (default: every installed one)")
    add_network_options(p, default="the parity case, DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2))")
    p.set_defaults(input_size=(32, 32), batch_size=8)
    p.add_argument("--steps", type=positive_int, default=20, help="lockstep SGD steps")
    p.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="float64: the proof, every figure within 1e-9; float32 (default): what people train in",
    )
    add_precision_option(p, what="is checked")
    p.add_argument("--seeds", type=seed_range, help="several seeds in one run, e.g. 0-15 (adds the worst per check)")
    p.add_argument("--naive", action="store_true", help="also show what each framework's default settings would change")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_parity)


def add_parity_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity-sweep",
        help="parity over many seeds, thread counts and oneDNN on/off, a process per setting: the margin table",
        description="Runs `densenet parity --seeds ... --json` in a fresh process for every thread count and oneDNN "
        "setting and prints the worst error, bound and margin per check as Markdown. Options after -- go to "
        "`densenet parity` (e.g. -- --config d2l --dtype float64).",
    )
    p.add_argument("--seeds", type=seed_range, default=list(range(16)), help="default 0-15")
    p.add_argument("--threads", type=positive_int_list, default=[1, 2], help="thread counts (default 1,2)")
    p.add_argument(
        "--onednn", type=on_off_list, default=[True, False], help="on, off or on,off (default): TF, MXNet, PyTorch"
    )
    p.add_argument("parity_args", nargs=argparse.REMAINDER, help="-- then options for densenet parity")
    p.set_defaults(func=cmd_parity_sweep)


def add_golden(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("golden", help="regenerate (or --check) the golden vectors in common/golden")
    p.add_argument("--check", action="store_true", help="compare with a fresh computation instead of writing")
    p.add_argument("--dir", help="directory of the files (default: common/golden in the package)")
    p.set_defaults(func=cmd_golden)
