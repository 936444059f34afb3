"""The ``densenet`` command (also ``python -m common``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from common.config import DenseNetConfig, plan
from common.errors import DenseNetError
from common.registry import BACKENDS, available, canonical_name, load_backend


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _positive_int(text: str) -> int:
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


def _seed_range(text: str) -> list[int]:
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


def _int_list(text: str) -> list[int]:
    return [_positive_int(v) for v in text.split(",") if v.strip()]


def _onoff_list(text: str) -> list[bool]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"expected on, off or on,off, got {text!r}")
    return [v == "on" for v in values]


def _optional_int(text: str) -> int | str:
    # "none" stays a string here: None already means "option not given".
    return "none" if text.lower() == "none" else int(text)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# option -> (config field, parser); every option defaults to None: "take it from --config".
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
    from common.config import CONFIGS

    g = p.add_argument_group(f"network (default: {default})")
    g.add_argument("--config", help=f"named configuration: {', '.join(CONFIGS)}")
    for option, (field, parse, text) in _CONFIG_OPTIONS.items():
        g.add_argument(option, dest=field, type=parse, default=None, help=text)
    return g


def _add_network_options(p: argparse.ArgumentParser, default: str = "d2l") -> None:
    g = add_config_options(p, default)
    g.add_argument("--input-size", type=_input_size, default=(96, 96), help="image side, or HxW")
    g.add_argument("--batch-size", type=_positive_int, default=1)
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace, default: DenseNetConfig | None = None) -> DenseNetConfig:
    """The named configuration (``--config``, else ``default``, else d2l) with any field options applied."""
    from common.config import named_config

    base = named_config(args.config) if args.config else (default or DenseNetConfig())
    changes = {
        field: None if value == "none" else value
        for field, _, _ in _CONFIG_OPTIONS.values()
        if (value := getattr(args, field)) is not None
    }
    return base.replace(**changes) if changes else base


def _backend_list(text: str | None) -> list[str] | None:
    if not text or text == "all":
        return None
    return [canonical_name(b) for b in text.split(",") if b.strip()]


def cmd_list(args: argparse.Namespace) -> int:
    statuses = available()
    if args.json:
        print(json.dumps([s.__dict__ for s in statuses], indent=2))
    else:
        rows = [(s.name, s.framework, s.version or "-", "yes" if s.available else f"no: {s.reason}") for s in statuses]
        print(format_table(["backend", "framework", "version", "available"], rows))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from common.harness import compare_shapes

    config = config_from_args(args)
    report = compare_shapes(_backend_list(args.backends), config, args.input_size, args.batch_size, args.seed)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1

    h, w = report.plan.input_size
    print(f"DenseNet {config.describe()}")
    print(f"input: {args.batch_size}x{config.in_channels}x{h}x{w} (NCHW), seeded uniform [0, 1), seed {args.seed}")
    print("shapes are NCHW whatever the framework's own layout\n")
    ran = report.ran()
    rows = []
    for stage, expected in report.expected().items():
        shapes = [str(r.stages.get(stage, "-")) for r in ran]
        rows.append([stage, str(expected), *shapes, "yes" if report.stage_agrees(stage) else "NO"])
    print(format_table(["stage", "expected", *[r.name for r in ran], "agree"], rows))
    print()
    rows = []
    for r in report.runs:
        status = {"ok": "ok", "unavailable": "unavailable", "error": "ERROR"}[r.status]
        rows.append(
            [
                r.name,
                r.version or "-",
                f"{r.num_params:,}" if r.num_params is not None else "-",
                f"{r.num_state:,}" if r.num_state is not None else "-",
                f"{r.build_s:.2f}" if r.build_s is not None else "-",
                f"{r.forward_s * 1000:.1f}" if r.forward_s is not None else "-",
                status,
            ]
        )
    print(format_table(["backend", "version", "params", "BN stats", "build s", "forward ms", "status"], rows))
    print(
        f"\nexpected parameters: {report.plan.num_params:,}; "
        f"forward cost: {report.plan.macs / 1e6:.1f} M multiply-adds per image"
    )
    for r in report.runs:
        if r.status == "unavailable" and r.name not in report.required:
            print(f"note: {r.name} skipped: {r.error}")
    if report.ok:
        print(f"OK: {len(ran)} backend(s) agree with each other and with the plan")
        return 0
    print("FAILED:\n  " + "\n  ".join(report.failures), file=sys.stderr)
    return 1


_STAGE_LAYERS = {
    "stem": "conv 7x7/2 pad 3, BN, ReLU, max pool 3x3/2 pad 1",
    "dense": "{n} x ({bottleneck}BN, ReLU, conv 3x3 pad 1), concatenated",
    "transition": "BN, ReLU, conv 1x1, avg pool 2x2/2",
    "head": "BN, ReLU, global avg pool, flatten, dense",
}


def cmd_summary(args: argparse.Namespace) -> int:
    from common.harness import make_input
    from common.layout import to_layout

    config = config_from_args(args)
    network_plan = plan(config, args.input_size)
    adapter = load_backend(args.backend)
    model = adapter.build(config, seed=args.seed)
    stages = adapter.stages(model, make_input(config, network_plan.input_size, args.batch_size, args.seed))
    weights = adapter.get_weights(model)
    rows = []
    for name, out in stages.items():
        kind = name.rstrip("0123456789")
        n = config.arch[int(name[len(kind) :]) - 1] if kind == "dense" else 0
        params = sum(v.size for k, v in weights.items() if k.split(".")[0] == name and "running" not in k)
        native_shape = tuple(to_layout(out, adapter.layout).shape)
        bottleneck = f"BN, ReLU, conv 1x1 to {config.bn_size * config.growth_rate}, " if config.bn_size else ""
        rows.append([name, _STAGE_LAYERS[kind].format(n=n, bottleneck=bottleneck), str(native_shape), f"{params:,}"])
    print(f"{adapter.framework} {adapter.version()}: DenseNet {config.describe()}")
    print(f"output shapes in {adapter.layout} (the framework's own layout)\n")
    print(format_table(["stage", "layers", "output shape", "params"], rows))
    print(
        f"\ntotal trainable parameters: {adapter.num_params(model):,}; "
        f"BatchNorm running statistics: {adapter.num_state(model):,}"
    )
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from common.parity import PARITY_CASE, run_naive, run_parity, summarize

    config = config_from_args(args, default=PARITY_CASE)
    say = None if args.json else (lambda message: print(f"  {message}", file=sys.stderr))
    seeds = args.seeds or [args.seed]
    reports = [
        run_parity(
            _backend_list(args.backends),
            config,
            args.input_size,
            args.batch_size,
            steps=args.steps,
            lr=args.lr,
            seed=seed,
            progress=say,
            dtype=args.dtype,
        )
        for seed in seeds
    ]
    naive = run_naive(config, args.input_size, args.batch_size, args.seed) if args.naive else []
    ok = all(r.ok for r in reports)
    if args.json:
        out = reports[0].to_dict() if len(reports) == 1 else {"seeds": seeds, "reports": [r.to_dict() for r in reports]}
        if len(reports) > 1:
            out["summary"] = summarize(reports)
            out["ok"] = ok
        print(json.dumps({**out, "naive": [asdict(r) for r in naive]}, indent=2))
        return 0 if ok else 1
    for report in reports:
        print(report.to_text() + "\n")
    if len(reports) > 1:
        rows = [
            [check, f"{s['error']:.2e}", f"{s['bound']:.2e}", f"{s['margin']:.1f}x", f"{s['where']}"]
            for check, s in summarize(reports).items()
        ]
        print(f"worst over seeds {seeds[0]}..{seeds[-1]} ({len(seeds)} runs):")
        print(format_table(["check", "error", "bound", "margin", "where"], rows))
    if naive:
        print("\nwith each framework's default instead (numpy oracle, same weights and input):")
        rows = [[r.default, r.frameworks, r.affects, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}"] for r in naive]
        print(format_table(["default", "frameworks", "changes", "max abs", "max rel"], rows))
    return 0 if ok else 1


def cmd_parity_sweep(args: argparse.Namespace) -> int:
    from common.parity import run_sweep

    forwarded = [a for a in (args.parity_args or []) if a != "--"]
    rows, failures = run_sweep(
        forwarded,
        args.seeds,
        args.threads,
        args.onednn,
        progress=lambda message: print(f"  {message}", file=sys.stderr),
    )
    command = " ".join(["densenet parity", *forwarded, "--seeds", f"{args.seeds[0]}-{args.seeds[-1]}"])
    print(f"worst over seeds {args.seeds[0]}-{args.seeds[-1]}, every backend and pair: `{command}`\n")
    print("| setting | check | worst error | bound | margin | where |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.setting} | {r.check} | {r.error:.2e} | {r.bound:.2e} | {r.margin:.1f}x | {r.where} |")
    if rows:
        print("\n| check | worst error, all settings | bound | margin |")
        print("|---|---|---|---|")
        for check in dict.fromkeys(r.check for r in rows):
            worst = min((r for r in rows if r.check == check), key=lambda r: r.margin)
            print(f"| {check} | {worst.error:.2e} | {worst.bound:.2e} | {worst.margin:.1f}x |")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures or not rows else 0


def cmd_golden(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common import golden

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


def cmd_train(args: argparse.Namespace) -> int:
    from common.train import TrainSettings, train

    settings = TrainSettings(
        backend=canonical_name(args.backend),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        resize=args.resize,
        limit=args.limit,
        test_limit=args.test_limit,
        seed=args.seed,
        config=config_from_args(args),
        lr_schedule=args.lr_schedule,
    )
    out = args.out or f"runs/{settings.backend}"
    metrics = train(settings, out, data_dir=args.data_dir, resume=args.resume, progress=not args.quiet)
    last = metrics[-1]
    print(
        f"{settings.backend}: {len(metrics)} epoch(s), test accuracy {last['test_acc']:.4f}, "
        f"test loss {last['test_loss']:.4f}, {last['images_per_s']:.0f} images/s; run in {out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from common import data
    from common.train import evaluate
    from common.weights import load_weights

    config, weights = load_weights(args.weights)
    adapter = load_backend(args.backend)
    model = adapter.build(config)
    adapter.set_weights(model, weights)
    split = data.subset(data.load("test", args.data_dir), args.limit)
    loss, acc = evaluate(adapter, model, split, args.batch_size, args.resize)
    if args.json:
        print(
            json.dumps(
                {
                    "backend": adapter.name,
                    "weights": args.weights,
                    "test_loss": loss,
                    "test_acc": acc,
                    "images": len(split.labels),
                }
            )
        )
    else:
        print(f"{adapter.name} on {len(split.labels)} test images: accuracy {acc:.4f}, loss {loss:.4f}")
    return 0


def cmd_data_speed(args: argparse.Namespace) -> int:
    import time

    from common import data

    split = data.subset(data.load("train", args.data_dir), args.limit)
    start = time.perf_counter()
    n = sum(len(y) for _, y in data.batches(split, args.batch_size, args.resize, seed=0, epoch=0))
    seconds = time.perf_counter() - start
    print(f"input pipeline: {n} images at {args.resize}x{args.resize} in {seconds:.2f} s = {n / seconds:,.0f} images/s")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from common.plot import plot_runs

    out = plot_runs(args.runs, args.out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densenet",
        description="The d2l DenseNet in PyTorch, MXNet, JAX/Flax and TensorFlow, side by side.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="backends and why any is unavailable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("compare", help="feed one seeded input to every backend and compare shapes stage by stage")
    p.add_argument(
        "--backends",
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: every installed one); "
        "a named backend that cannot load is a failure",
    )
    _add_network_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("summary", help="layer-by-layer shape table of one backend (the book's layer_summary)")
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    _add_network_options(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "parity",
        help="identical weights and inputs in every backend: compare forward, gradients, SGD steps",
        description="Defaults: the parity case, DenseNetConfig(16, 16, (2, 2)) on 8x1x32x32. For the book's "
        "network add --config d2l (its lockstep losses diverge: docs/parity.md).",
    )
    p.add_argument("--backends", help="comma-separated subset (default: every installed one)")
    _add_network_options(p, default="the parity case, DenseNetConfig(16, 16, (2, 2))")
    p.set_defaults(input_size=(32, 32), batch_size=8)
    p.add_argument("--steps", type=_positive_int, default=20, help="lockstep SGD steps")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="float64: the proof, every figure within 1e-9; float32: what people train in",
    )
    p.add_argument("--seeds", type=_seed_range, help="several seeds in one run, e.g. 0-15 (reports the worst)")
    p.add_argument("--naive", action="store_true", help="also show what each framework's default settings would change")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser(
        "parity-sweep",
        help="parity over many seeds, thread counts and oneDNN on/off, one process per setting: the margin table",
        description="Runs `densenet parity --seeds ... --json` in a fresh process for every thread count and oneDNN "
        "setting and prints the worst error, bound and margin per check as a Markdown table. Options after -- "
        "go to `densenet parity` (e.g. -- --config d2l --dtype float64).",
    )
    p.add_argument("--seeds", type=_seed_range, default=list(range(16)), help="default 0-15")
    p.add_argument("--threads", type=_int_list, default=[1, 2], help="comma-separated thread counts (default 1,2)")
    p.add_argument(
        "--onednn", type=_onoff_list, default=[True, False], help="on, off or on,off (default): TF, MXNet, PyTorch"
    )
    p.add_argument("parity_args", nargs=argparse.REMAINDER, help="-- then options for densenet parity")
    p.set_defaults(func=cmd_parity_sweep)

    p = sub.add_parser("train", help="train on Fashion-MNIST (the book's recipe by default)")
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    add_config_options(p)
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.01, help="plain SGD learning rate")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="constant (the book) or cosine annealing to 0 over the run",
    )
    p.add_argument("--resize", type=_positive_int, default=96, help="image side after bilinear resizing")
    p.add_argument("--limit", type=_positive_int, help="train on the first N training images")
    p.add_argument("--test-limit", type=_positive_int, help="evaluate on the first N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory (default runs/BACKEND)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--data-dir", help="directory with the four Fashion-MNIST .gz files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy of a canonical weight file in any backend")
    p.add_argument("--weights", required=True, metavar="FILE")
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    p.add_argument("--resize", type=_positive_int, default=96)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--limit", type=_positive_int, help="the first N test images")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("data-speed", help="images per second of the shared input pipeline (one epoch)")
    p.add_argument("--resize", type=_positive_int, default=96)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--limit", type=_positive_int)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_data_speed)

    p = sub.add_parser("plot", help="draw the training curves of one or more runs in one figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("golden", help="regenerate (or --check) the golden vectors in common/golden")
    p.add_argument("--check", action="store_true", help="compare with a fresh computation instead of writing")
    p.add_argument("--dir", help="directory of the files (default: common/golden in the package)")
    p.set_defaults(func=cmd_golden)

    from common import cli_weights

    cli_weights.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DenseNetError as exc:
        print(f"densenet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
