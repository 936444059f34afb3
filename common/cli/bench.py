"""``densenet bench``: speed and peak memory of every backend in every execution mode."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.adapter import PRECISIONS
from common.bench import (
    MODES,
    PHASES,
    RUNTIME,
    BenchCase,
    BenchError,
    parse_modes,
    parse_precisions,
    run_bench,
    run_case,
)
from common.cli.options import _input_size, add_config_options, backend_list, config_from_args, positive_int
from common.errors import DenseNetError, Failed
from common.limits import check_memory
from common.training.plot import plot_bench

__all__ = ["add_bench", "cmd_bench"]


def _phases(text: str) -> list[str]:
    items = [v.strip().lower() for v in text.split(",")]
    if not text.strip() or any(v not in PHASES for v in items):
        raise argparse.ArgumentTypeError(f"expected train, inference or train,inference, got {text!r}")
    return items


def _precisions(text: str) -> list[str]:
    try:
        return parse_precisions(text)
    except BenchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _backends(text: str | None) -> list[str]:
    """``--backends``: the frameworks, and ``onnxruntime`` (ONNX Runtime on PyTorch's export)."""
    if text is None or text.strip().lower() == "all":
        return list(MODES)
    items = [v.strip().lower() for v in text.split(",")]
    frameworks = ",".join(v for v in items if v != RUNTIME)
    named = backend_list(frameworks) or [] if frameworks else []
    return [b for b in MODES if b in named or (b == RUNTIME and RUNTIME in items)]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.child:  # one case, measured in this process (run_bench starts it)
        print(json.dumps(run_case(BenchCase.from_dict(json.loads(args.child)))))
        return 0
    config = config_from_args(args)
    backends = _backends(args.backends)
    modes = parse_modes(args.modes, backends)
    check_memory(config, args.input_size, args.batch_size)
    if args.plot is not None:
        plot = Path(args.plot)
        if plot.is_dir() or not plot.parent.is_dir():
            raise DenseNetError(f"--plot {plot}: name a PNG file in an existing directory")

    def say(message: str) -> None:
        if not args.quiet:
            print(f"  {message}", file=sys.stderr, flush=True)

    def warn(message: str) -> None:  # also with --quiet: it is about the numbers, not progress
        print(f"densenet bench: warning: {message}", file=sys.stderr, flush=True)

    report = run_bench(
        [b for b in backends if b in modes],
        modes,
        config,
        phases=args.phases,
        precisions=args.precision,
        batch_size=args.batch_size,
        input_size=args.input_size,
        steps=args.steps,
        warmup=args.warmup,
        memory_efficient=args.memory_efficient,
        timeout=args.timeout,
        progress=say,
        warn=warn,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    if args.plot is not None:
        out = plot_bench(report.to_dict(), args.plot)
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    # A case the backend does not offer (n/a) is no failure; one that failed is, whatever else ran.
    failed, measured = report.failed, report.measured
    if failed and not measured:
        na = f", {len(report.not_applicable)} n/a" if report.not_applicable else ""
        raise Failed(f"no case was measured: {len(failed)} failed{na} (first: {failed[0]['error']})")
    if not measured:
        print("densenet bench: nothing was measured: every case asked for is n/a (see why above)", file=sys.stderr)
    return 1 if failed else 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="speed and peak memory of every backend and execution mode (each case in its own process)",
        description="Times training steps and inference forward passes of every backend in every mode "
        "(eager and each compiled path: " + "; ".join(f"{b}: {', '.join(m)}" for b, m in MODES.items()) + "), "
        "each case in its own process so its peak memory is its own, with the load it ran under. A case a "
        "backend does not offer (JAX's eager training step) is n/a, with why; exit status 1 if any case failed.",
    )
    add_config_options(p)
    run = p.add_argument_group("benchmark")
    run.add_argument(
        "--backends",
        help=f"comma-separated subset of the four and {RUNTIME} (ONNX Runtime on PyTorch's ONNX export; "
        "inference only) (default: all)",
    )
    run.add_argument("--modes", help="comma-separated modes, 'compiled' for every non-eager one (default: all)")
    run.add_argument("--phases", type=_phases, default=list(PHASES), help="train, inference or both")
    run.add_argument(
        "--precision",
        type=_precisions,
        default=["float32"],
        help=f"comma-separated: {', '.join(PRECISIONS)} (mixed precision); with both, their speed ratio",
    )
    run.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    run.add_argument("--input-size", type=_input_size, default=(96, 96), help="image side, or HxW")
    run.add_argument("--steps", type=positive_int, default=5, help="timed steps per case")
    run.add_argument("--warmup", type=positive_int, default=1, help="untimed steps first (the first is timed apart)")
    run.add_argument("--memory-efficient", action="store_true", help="recompute the dense layers' BN-ReLU in backward")
    run.add_argument("--timeout", type=positive_int, default=600, help="seconds a case may take before it is killed")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the report as JSON")
    out.add_argument("--plot", metavar="FILE", help="also draw the results as a PNG")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
