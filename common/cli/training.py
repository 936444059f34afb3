"""``densenet train``, ``evaluate``, ``data-speed`` and ``plot``: Fashion-MNIST runs."""

from __future__ import annotations

import argparse
import json
import time

from common import data
from common.cli.options import add_config_options, config_from_args, positive_int
from common.plot import plot_runs
from common.registry import BACKENDS, canonical_name, load_backend
from common.train import TrainSettings, evaluate, train
from common.weights import load_weights

__all__ = [
    "add_data_speed",
    "add_evaluate",
    "add_plot",
    "add_train",
    "cmd_data_speed",
    "cmd_evaluate",
    "cmd_plot",
    "cmd_train",
]


def cmd_train(args: argparse.Namespace) -> int:
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
    config, weights = load_weights(args.weights)
    adapter = load_backend(args.backend)
    model = adapter.build(config)
    adapter.set_weights(model, weights)
    split = data.subset(data.load("test", args.data_dir), args.limit)
    loss, acc = evaluate(adapter, model, split, args.batch_size, args.resize)
    if args.json:
        result = {"backend": adapter.name, "weights": args.weights, "test_loss": loss, "test_acc": acc}
        print(json.dumps({**result, "images": len(split.labels)}))
    else:
        print(f"{adapter.name} on {len(split.labels)} test images: accuracy {acc:.4f}, loss {loss:.4f}")
    return 0


def cmd_data_speed(args: argparse.Namespace) -> int:
    split = data.subset(data.load("train", args.data_dir), args.limit)
    start = time.perf_counter()
    n = sum(len(y) for _, y in data.batches(split, args.batch_size, args.resize, seed=0, epoch=0))
    seconds = time.perf_counter() - start
    print(f"input pipeline: {n} images at {args.resize}x{args.resize} in {seconds:.2f} s = {n / seconds:,.0f} images/s")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    out = plot_runs(args.runs, args.out)
    print(f"wrote {out}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train on Fashion-MNIST (the book's recipe by default)")
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    add_config_options(p)
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.01, help="plain SGD learning rate")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="constant (the book) or cosine annealing to 0 over the run",
    )
    p.add_argument("--resize", type=positive_int, default=96, help="image side after bilinear resizing")
    p.add_argument("--limit", type=positive_int, help="train on the first N training images")
    p.add_argument("--test-limit", type=positive_int, help="evaluate on the first N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory (default runs/BACKEND)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--data-dir", help="directory with the four Fashion-MNIST .gz files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test accuracy of a canonical weight file in any backend")
    p.add_argument("--weights", required=True, metavar="FILE")
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    p.add_argument("--resize", type=positive_int, default=96)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--limit", type=positive_int, help="the first N test images")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def add_data_speed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data-speed", help="images per second of the shared input pipeline (one epoch)")
    p.add_argument("--resize", type=positive_int, default=96)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--limit", type=positive_int)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_data_speed)


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the training curves of one or more runs in one figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.set_defaults(func=cmd_plot)
