"""``densenet teach``, ``notebooks`` and ``exercise``: teaching material generated from the code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import resources
from common.cli.options import backend_list, positive_int
from common.config import CONFIGS, D2L
from common.errors import DenseNetError
from common.registry import BACKENDS
from common.render import format_table
from common.teach.exercises import (
    BOOK_RESNET18,
    RESNET50,
    RESNET50_PUBLISHED,
    activation_bytes,
    densenet_stage_params,
    family_rows,
    memory_child,
    memory_rows,
    resnet_stages,
    run_dense_mlp,
    run_pooling,
)
from common.teach.facts import measure_backends
from common.teach.notebooks import notebook_paths, sync
from common.teach.page import SiteOptions, build_site
from common.verify.parity import run_parity

__all__ = ["add_exercise", "add_notebooks", "add_parsers", "add_teach", "cmd_exercise", "cmd_notebooks", "cmd_teach"]

# Results files the site reads by default when they exist (docs/results/README.md says how
# each is produced).
DEFAULT_PARITY = ("parity_float32.json", "parity_float64.json")
DEFAULT_BENCHMARK = ("benchmark.json", "memory_224.json")


def cmd_teach(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        if not args.quiet:
            print(f"  {message}", file=sys.stderr)

    docs = Path(args.docs) if args.docs else resources.docs_dir()
    results = docs / "results"
    named = [Path(p) for p in (args.parity or []) + ([args.benchmark] if args.benchmark else [])]
    missing = [str(p) for p in named if not p.is_file()]
    if missing:
        raise DenseNetError(f"no such results file: {', '.join(missing)}")
    if args.parity:
        parity = [Path(p) for p in args.parity]
    else:
        parity = [p for p in (results / n for n in DEFAULT_PARITY) if p.is_file()]
    benchmark = (
        Path(args.benchmark)
        if args.benchmark
        else next((results / n for n in DEFAULT_BENCHMARK if (results / n).is_file()), None)
    )
    options = SiteOptions(input_size=args.input_size, docs=docs, parity=[] if args.run_parity else parity)
    options.benchmark = benchmark
    if args.run_parity:
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
    p.add_argument("--docs", metavar="DIR", help="the docs directory (default: docs/ here, or the copy in the package)")
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
    if args.dir:
        directory = Path(args.dir)
    elif (root := resources.checkout_root()) is not None:
        directory = root / "notebooks"
    else:
        raise DenseNetError(
            "the notebooks belong to a source checkout and this suite is an installed "
            "package; name the directory of the densenet_*.py scripts with --dir"
        )
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


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr)


def _exercise_pooling(args: argparse.Namespace) -> int:
    pools = [p.strip() for p in args.transition_pool.split(",") if p.strip()]
    out = Path(args.out)
    results = run_pooling(
        args.backend,
        pools,
        out,
        epochs=args.epochs,
        resize=args.resize,
        lr=args.lr,
        batch_size=args.batch_size,
        limit=args.limit,
        test_limit=args.test_limit,
        seed=args.seed,
        progress=_say,
    )
    rows = []
    for pool, metrics in results.items():
        last = metrics[-1]
        per_epoch = " ".join(f"{m['test_acc']:.4f}" for m in metrics)
        rows.append(
            [pool, f"{last['test_acc']:.4f}", f"{last['test_loss']:.4f}", f"{last['train_loss']:.4f}", per_epoch]
        )
    print(
        f"{args.backend}, the book's network, {args.epochs} epochs at {args.resize}x{args.resize}, batch "
        f"{args.batch_size}, SGD {args.lr:g} with cosine annealing, seed {args.seed}"
    )
    print(format_table(["transition pool", "test acc", "test loss", "train loss", "test acc per epoch"], rows))
    print(f"curves: {out / 'curves.png'}")
    return 0


def _exercise_params(args: argparse.Namespace) -> int:
    size = args.input_size
    for title, dense, dense_name, resnet in (
        ("the book's networks (1 channel, 10 classes)", D2L, "DenseNet (d2l 8.7)", BOOK_RESNET18),
        ("ImageNet (3 channels, 1000 classes)", CONFIGS["densenet121"], "DenseNet-121", RESNET50),
    ):
        d_rows, r_rows = densenet_stage_params(dense, size), resnet_stages(resnet, size)
        rows = [
            [d[0], f"{d[1]:,}", f"{r[1]:,}", f"{r[1] / d[1]:.1f}x", f"{d[2] / 1e6:,.1f}", f"{r[2] / 1e6:,.1f}"]
            for d, r in zip(d_rows, r_rows)
        ]
        d_total, r_total = sum(d[1] for d in d_rows), sum(r[1] for r in r_rows)
        d_macs, r_macs = sum(d[2] for d in d_rows), sum(r[2] for r in r_rows)
        rows.append(
            [
                "total",
                f"{d_total:,}",
                f"{r_total:,}",
                f"{r_total / d_total:.1f}x",
                f"{d_macs / 1e6:,.1f}",
                f"{r_macs / 1e6:,.1f}",
            ]
        )
        print(f"{title}: {dense_name} against {resnet.name}; M multiply-adds at {size}x{size}")
        headers = ["stage", dense_name, resnet.name.split(" (")[0], "ratio", "DenseNet MMACs", "ResNet MMACs"]
        print(format_table(headers, rows) + "\n")
    print(f"ResNet-50 as torchvision publishes it: {RESNET50_PUBLISHED:,} parameters")
    return 0


def _exercise_memory(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(memory_child(args.child, args.input_size, args.batch_size, args.memory_efficient)))
        return 0
    names = backend_list(args.backends) or list(BACKENDS)
    rows = memory_rows(names, args.input_size, args.batch_size, progress=_say, memory_efficient=args.memory_efficient)
    total, concat = activation_bytes(D2L, args.input_size, args.batch_size)
    note = (
        f"The book's network{' (memory-efficient)' if args.memory_efficient else ''}, one SGD step at "
        f"{args.input_size}x{args.input_size}, batch {args.batch_size}, "
        "float32, CPU, each backend in a fresh process: peak resident memory during the step minus the resident "
        f"memory before it. For scale: every layer output of the forward pass takes {total / 2**20:,.0f} MiB, "
        f"the dense blocks' concatenations alone {concat / 2**20:,.0f} MiB. (`densenet exercise memory`)"
    )
    if args.save:
        results = {
            "title": f"Memory of one training step at {args.input_size}x{args.input_size}",
            "note": note,
            "metrics": ["step_peak_mb", "step_seconds"],
            "labels": {"step_peak_mb": "peak memory of the step (MiB)", "step_seconds": "step time (s)"},
        }
        Path(args.save).write_text(json.dumps({**results, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    table_rows = [
        [r["backend"], "-", "-", "-", r["error"]]
        if "error" in r
        else [
            r["backend"],
            f"{r['step_peak_mb']:,.0f}",
            f"{r['rss_after_build_mb']:,.0f}",
            f"{r['step_seconds']:.1f}",
            "",
        ]
        for r in rows
    ]
    print(note + "\n")
    print(format_table(["backend", "step peak MiB", "resident before MiB", "step s", "error"], table_rows))
    if args.save:
        print(f"wrote {args.save}")
    return 0 if all("error" not in r for r in rows) else 1


def _exercise_family(args: argparse.Namespace) -> int:
    rows = [
        [
            r["name"],
            str(r["depth"]),
            str(r["growth_rate"]),
            ", ".join(map(str, r["blocks"])),
            "yes" if r["bottleneck"] else "no",
            f"{r['params']:,}",
            f"{r['published']:,}" if r["published"] else "-",
            f"{r['gmacs']:.2f}",
        ]
        for r in family_rows(args.input_size)
    ]
    headers = ["name", "depth", "growth", "blocks", "bottleneck", "parameters", "published", "GMACs"]
    print(f"every named configuration at {args.input_size}x{args.input_size} (common.config.CONFIGS)")
    print(format_table(headers, rows))
    return 0


def _exercise_dense_mlp(args: argparse.Namespace) -> int:
    rows = run_dense_mlp(epochs=args.epochs, seed=args.seed)
    print(
        "elevation (m) from position on matplotlib's sample terrain model (jacksboro_fault_dem.npz), 4,000 "
        f"training and 4,000 test points, Adam 3e-3 with cosine annealing, {args.epochs} epochs, seed {args.seed}"
    )
    table_rows = [
        [
            r["model"],
            str(r.get("layers", "-")),
            str(r.get("width", "-")),
            f"{r['params']:,}" if "params" in r else "-",
            f"{r['train_rmse_m']:.2f}" if "train_rmse_m" in r else "-",
            f"{r['test_rmse_m']:.2f}",
        ]
        for r in rows
    ]
    print(format_table(["model", "layers", "width", "parameters", "train RMSE m", "test RMSE m"], table_rows))
    return 0


def cmd_exercise(args: argparse.Namespace) -> int:
    return args.exercise_func(args)


def add_exercise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exercise", help="the exercises of d2l 8.7, answered with numbers (docs/exercises.md)")
    ex = p.add_subparsers(dest="exercise", required=True, metavar="EXERCISE")

    q = ex.add_parser("pooling", help="1: average vs max pooling in the transition layers, trained alike")
    q.add_argument("--backend", default="torch", help="torch or tf (the pool is swapped in the built network)")
    q.add_argument("--transition-pool", default="avg,max", help="avg, max or avg,max (default)")
    q.add_argument("--epochs", type=positive_int, default=5)
    q.add_argument("--resize", type=positive_int, default=32)
    q.add_argument("--lr", type=float, default=0.1)
    q.add_argument("--batch-size", type=positive_int, default=128)
    q.add_argument("--limit", type=positive_int)
    q.add_argument("--test-limit", type=positive_int)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="runs/exercise-pooling", help="a run directory per pool and curves.png")
    q.set_defaults(exercise_func=_exercise_pooling)

    q = ex.add_parser("params", help="2: parameters and multiply-adds per stage, DenseNet against ResNet")
    q.add_argument("--input-size", type=positive_int, default=224)
    q.set_defaults(exercise_func=_exercise_params)

    q = ex.add_parser("memory", help="3: peak memory of one training step at 224x224, per backend")
    q.add_argument("--backends", help="comma-separated subset (default: all four)")
    q.add_argument("--input-size", type=positive_int, default=224)
    q.add_argument("--batch-size", type=positive_int, default=32)
    q.add_argument("--save", metavar="FILE", help="also write the results (JSON) that `densenet teach` charts")
    q.add_argument("--memory-efficient", action="store_true", help="the memory-efficient network (recomputes BN-ReLU)")
    q.add_argument("--child", help=argparse.SUPPRESS)  # one backend, measured in this process
    q.set_defaults(exercise_func=_exercise_memory)

    q = ex.add_parser("family", help="4: the variants of Table 1: parameters and multiply-adds")
    q.add_argument("--input-size", type=positive_int, default=224)
    q.set_defaults(exercise_func=_exercise_family)

    q = ex.add_parser("dense-mlp", help="5: dense connectivity in an MLP, on a regression data set")
    q.add_argument("--epochs", type=positive_int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(exercise_func=_exercise_dense_mlp)
    p.set_defaults(func=cmd_exercise)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``teach``, ``notebooks`` and ``exercise``."""
    add_teach(sub)
    add_notebooks(sub)
    add_exercise(sub)
