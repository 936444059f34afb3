"""``densenet train``, ``evaluate``, ``data-speed`` and ``plot``: Fashion-MNIST runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import data, distributed
from common.cli.options import (
    add_config_options,
    add_precision_option,
    config_from_args,
    config_options_given,
    fraction,
    nonnegative_int,
    positive_float,
    positive_int,
    positive_int_list,
    seed,
)
from common.config import DenseNetConfig
from common.data.folder import DEFAULT_VAL_FRACTION as DEFAULT_VAL
from common.deploy.export import read_manifest
from common.deploy.runtime import onnxruntime_version, runner
from common.errors import DenseNetError, Failed, Interrupted
from common.limits import check_memory
from common.process import lifeline, threads
from common.registry import BACKENDS, canonical_name, load_backend
from common.training.callbacks import speed
from common.training.engine import evaluate, score
from common.training.optim import SCHEDULES
from common.training.plot import plot_runs
from common.training.progress import Progress
from common.training.run import train
from common.training.rundir import RunDir
from common.training.settings import TrainSettings
from common.weights.canonical import CanonicalFile, load_canonical
from common.weights.starting import FORMATS as INIT_FORMATS
from common.weights.starting import read_init

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

EVAL_BATCH = 256


def _train_config(args: argparse.Namespace):
    """The network to train: the options on top of ``--config`` (d2l by default), or, with
    ``--init``, on top of the configuration the file holds (``--num-classes`` replaces its head)."""
    if args.init is None or args.config:
        return config_from_args(args)
    return config_from_args(args, default=read_init(args.init, args.init_format).config)


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
        config=_train_config(args),
        dataset=args.dataset,
        val_fraction=args.val_fraction,
        augment=args.augment,
        augment_padding=args.augment_padding,
        init=args.init,
        init_format=args.init_format,
        workers=args.workers,
        sync_bn=args.sync_bn,
        **optimizer_settings(args),
        memory_efficient=args.memory_efficient,
        precision=args.precision,
    )
    check_memory(settings.config, settings.resize, max(settings.batch_size, EVAL_BATCH))
    out = args.out or f"runs/{settings.backend}"
    group = None
    if args.distributed:  # one worker of a group an engine's launcher (or ours) started
        group = distributed.connect(settings.backend)
        settings.workers = group.world
    elif args.workers > 1:
        return _launch_workers(args, settings, out)
    try:
        metrics = train(
            settings,
            out,
            data_dir=args.data_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
            group=group,
        )
    finally:
        if group is not None:
            group.close()
    if group is not None and not group.writer:
        return 0
    last = metrics[-1]
    on = "val" if settings.dataset == "folder" else "test"
    print(
        f"{settings.backend}: {len(metrics)} epoch(s), {on} accuracy {last['test_acc']:.4f}, "
        f"{on} loss {last['test_loss']:.4f}, {speed(last['images_per_s'])}; run in {out}"
    )
    return 0


def _launch_workers(args: argparse.Namespace, settings: TrainSettings, out: str) -> int:
    """``--workers N``: N worker processes of the backend's engine on this machine, each running
    this command with ``--distributed`` (common.distributed.launch)."""
    if distributed.in_worker():
        raise DenseNetError("--workers inside a distributed worker: a worker runs with --distributed")
    # What can be refused is refused here, before any process or framework starts.
    if settings.sync_bn:
        distributed.check_sync_bn(settings.backend)
    distributed.check_divisible(settings.batch_size, settings.workers)
    rundir = RunDir(out).check(resume=args.resume, overwrite=args.overwrite)
    argv = distributed.without_option(args.argv, "--workers")
    # The launcher holds the run directory's lock for the whole job; worker 0 writes under it.
    with rundir.locked(), _environ(rundir.lock_env()):
        code = distributed.launch(
            settings.backend,
            [sys.executable, "-m", "common", *argv, "--distributed"],
            args.workers,
            timeout_s=distributed.job_timeout_s(),
        )
    if code == 130:
        how = lifeline.describe(lifeline.interrupted() or signal.SIGINT)
        raise Interrupted(f"interrupted ({how}); every worker was stopped (see above for what was kept)")
    if code:
        status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        raise Failed(f"the {args.workers}-worker run failed ({status}); every worker was stopped")
    return 0


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (and so its children's) for the block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _recorded_settings(metadata: dict[str, str]) -> dict[str, object]:
    """The training settings a run recorded in its weight file's metadata ({} when none)."""
    try:
        value = json.loads(metadata.get("settings", "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _recorded_resize(metadata: dict[str, str]) -> int | None:
    """The resize a training run recorded in its weight file's metadata, if any."""
    value = _recorded_settings(metadata).get("resize")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _evaluation_split(args: argparse.Namespace, found, resize: int) -> tuple[data.Dataset, str]:
    """The data set ``--dataset`` names, read for the file's network, and how its split was made.

    A folder without val/ is split with ``--val-fraction``, else with the fraction the file's
    training recorded (so its validation images are the ones it was judged on), else the default.
    """
    config = found.config
    if args.dataset != "folder" and config.num_classes != 10:  # refused before any data is read or fetched
        name = "Fashion-MNIST" if args.dataset == "fashion-mnist" else "CIFAR-10"
        raise DenseNetError(
            f"{args.weights} holds DenseNet {config.describe()}; evaluating on {name} needs num_classes=10 and "
            f"in_channels=1 or 3 (images converted to the network's channels)"
        )
    if config.in_channels not in (1, 3):
        raise DenseNetError(
            f"{args.weights} holds DenseNet {config.describe()}; evaluating needs in_channels=1 or 3 "
            f"(images converted to the network's channels)"
        )
    recorded = _recorded_settings(found.metadata)
    val_fraction, split_from = args.val_fraction, "--val-fraction"
    if args.dataset == "folder" and val_fraction is None:
        trained = recorded.get("val_fraction") if recorded.get("dataset") == "folder" else None
        if isinstance(trained, float) and 0 < trained < 1:
            val_fraction, split_from = trained, "the file's training settings; --val-fraction overrides"
        else:
            split_from = f"the default, {DEFAULT_VAL}"
    dataset = data.open_dataset(
        args.dataset, args.data_dir, channels=config.in_channels, size=resize, val_fraction=val_fraction
    )
    if dataset.num_classes != config.num_classes:
        shown = ", ".join(dataset.classes[:5]) + (", ..." if dataset.num_classes > 5 else "")
        raise DenseNetError(
            f"{args.weights} holds DenseNet {config.describe()}, which predicts {config.num_classes} classes; "
            f"{dataset.name} in {dataset.info.get('dir')} has {dataset.num_classes} ({shown})"
        )
    if args.dataset != "folder" or "train/ and val/" in str(dataset.info.get("layout", "")):
        split_from = f"the {dataset.test_name} split of {dataset.name}"
    else:
        split_from = f"the {dataset.test_name} split of {dataset.name}, {dataset.info['layout']} ({split_from})"
    return dataset, split_from


RUNTIMES = ("framework", "onnxruntime")


def _resize(args: argparse.Namespace, recorded: int | None) -> tuple[int, str]:
    if args.resize is not None:
        return args.resize, "--resize"
    if recorded is not None:
        return recorded, "the file's training settings; --resize overrides"
    return 96, "the default; the file records no training resize"


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.runtime == "onnxruntime":
        return _evaluate_onnx(args)
    if args.backend is None:
        raise DenseNetError("--backend is required to evaluate a weight file (or --runtime onnxruntime for an export)")
    backend = canonical_name(args.backend)  # an unknown name is refused before any file is read
    # Network options, when given, state what the file must hold; the file's own configuration is used.
    expected = config_from_args(args) if config_options_given(args) else None
    found = load_canonical(args.weights, expected)
    config = found.config
    resize, why = _resize(args, _recorded_resize(found.metadata))
    check_memory(config, resize, args.batch_size)
    dataset, split_from = _evaluation_split(args, found, resize)
    adapter = load_backend(backend)
    model = adapter.build(config, precision=args.precision)
    adapter.set_weights(model, found.weights)
    label = f"{adapter.name}{' in bfloat16 mixed precision' if args.precision == 'bfloat16' else ''}"
    return _report_evaluation(
        args,
        adapter.name,
        label,
        found,
        dataset,
        split_from,
        (resize, why),
        lambda split, bar: evaluate(adapter, model, split, args.batch_size, resize, bar.evaluating, config.in_channels),
    )


def _evaluate_onnx(args: argparse.Namespace) -> int:
    """``--runtime onnxruntime``: an ONNX export (``densenet export``'s directory) run by ONNX
    Runtime, on the same images and with the same measure as a framework."""
    if args.precision != "float32":
        raise DenseNetError("--precision bfloat16 is a framework's mixed precision; an ONNX export computes as written")
    manifest = read_manifest(args.weights)
    if manifest["format"] not in ("onnx", "onnx-int8"):
        raise DenseNetError(
            f"{args.weights} holds a {manifest['native_format']} export; ONNX Runtime runs the onnx formats "
            f"(evaluate it with --backend {manifest['backend']} from its weight file)"
        )
    config = DenseNetConfig.from_dict(manifest["config"])
    side = manifest["input"]["shape"][2 if manifest["layout"] == "NCHW" else 1]
    if args.resize is not None and args.resize != side:
        raise DenseNetError(f"{args.weights} takes {side}x{side} images; --resize {args.resize} cannot be fed to it")
    found = CanonicalFile(config, {}, {})
    resize, why = side, "the export's input size"
    dataset, split_from = _evaluation_split(args, found, resize)
    run = runner(args.weights, manifest, threads.current())
    label = f"ONNX Runtime {onnxruntime_version()} ({manifest['format']} from {manifest['backend']})"

    def measure(split, bar):
        loss, correct = score(run, split, args.batch_size, resize, bar.evaluating, config.in_channels)
        return loss / len(split.labels), correct / len(split.labels)

    return _report_evaluation(args, "onnxruntime", label, found, dataset, split_from, (resize, why), measure)


def _report_evaluation(
    args, name: str, label: str, found, dataset, split_from: str, resize_why: tuple[int, str], measure
) -> int:
    config = found.config
    resize, why = resize_why
    split = data.subset(dataset.test, args.limit)
    note = dataset.channel_note(config.in_channels)
    if note and not args.json:
        print(f"note: {note}", file=sys.stderr)
    bar = Progress(f"{name} evaluate", 0, 0, quiet=args.json)
    start = time.perf_counter()
    try:
        loss, acc = measure(split, bar)
    finally:
        bar.close()
    if not math.isfinite(loss):
        raise Failed(f"the network's outputs are not finite on these images (loss {loss}); the weights are unusable")
    used = {"config": config.to_dict(), "resize": resize, "resize_from": why}
    if args.json:
        result = {"backend": name, "runtime": args.runtime, "weights": args.weights, "test_loss": loss}
        result |= {"test_acc": acc, "precision": args.precision}
        on = {"dataset": dataset.name, "split": dataset.test_name, "split_from": split_from}
        print(json.dumps({**result, "images": len(split.labels), **on, **used}))
    else:
        print(f"{args.weights}: DenseNet {config.describe()} (the file's configuration)")
        print(
            f"{label} on {len(split.labels)} images of {split_from}, at {resize}x{resize} ({why}): "
            f"accuracy {acc:.4f}, loss {loss:.4f} ({time.perf_counter() - start:.1f} s)"
        )
    return 0


def cmd_data_speed(args: argparse.Namespace) -> int:
    split = data.subset(data.load("train", args.data_dir), args.limit)
    start = time.perf_counter()
    n = sum(len(y) for _, y in data.batches(split, args.batch_size, args.resize, seed=0, epoch=0))
    seconds = max(time.perf_counter() - start, 1e-9)
    print(f"input pipeline: {n} images at {args.resize}x{args.resize} in {seconds:.2f} s = {n / seconds:,.0f} images/s")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.out or "curves.png")
    if args.out is None and out.exists():
        raise DenseNetError(
            f"{out} already exists and no --out was given; name the file to write with --out "
            "(naming this one replaces it)"
        )
    out = plot_runs(args.runs, out)
    print(f"wrote {out}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train on Fashion-MNIST, CIFAR-10 or your own image folder (the book's recipe by default)",
        description="Train on Fashion-MNIST (or --dataset cifar10/folder). A quick try: --limit 512 --test-limit 512 "
        "--resize 32 --epochs 1. A live progress line on a terminal, one line per epoch in a log.",
    )
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    add_config_options(p)
    run = p.add_argument_group("training")
    run.add_argument("--epochs", type=positive_int, default=10, help="epochs to train")
    run.add_argument("--batch-size", type=positive_int, default=128, help="images per SGD step")
    run.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (the schedule's base)")
    add_optimizer_options(p)
    run.add_argument("--resize", type=positive_int, default=96, help="image side after bilinear resizing")
    run.add_argument(
        "--limit", type=positive_int, help="train on the first N training images (see --test-limit for the test set)"
    )
    run.add_argument(
        "--test-limit",
        type=positive_int,
        help="evaluate after each epoch on the first N test images (default: all 10,000)",
    )
    run.add_argument("--seed", type=seed, default=0, help="seed of the weights and the shuffle")
    run.add_argument(
        "--memory-efficient",
        action="store_true",
        help="recompute each dense layer's concatenation, BatchNorm and ReLU in the backward pass (less memory)",
    )
    add_precision_option(run, what="trains")
    dist = p.add_argument_group("data-parallel training (docs/distributed.md)")
    dist.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="worker processes on this machine, on the backend's distributed engine (--batch-size is the global batch)",
    )
    dist.add_argument(
        "--sync-bn",
        action="store_true",
        help="BatchNorm statistics over the global batch (jax, tf; refused where the engine has none across processes)",
    )
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="run as one worker of a group the engine's launcher started (torchrun, TF_CONFIG, tools/launch.py, "
        "DENSENET_JAX_*)",
    )
    files = p.add_argument_group("files")
    files.add_argument("--out", help="run directory (default runs/BACKEND); refused if it holds a run, see below")
    files.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    files.add_argument("--overwrite", action="store_true", help="replace the run --out holds")
    files.add_argument(
        "--data-dir",
        help="the data set's directory, used as it is or refused: the four Fashion-MNIST .gz files (default: "
        "found or downloaded), CIFAR-10's .bin files, or an image folder",
    )
    start = p.add_argument_group("data and starting weights (docs/training.md)")
    start.add_argument(
        "--dataset",
        choices=data.DATASETS,
        default="fashion-mnist",
        help="cifar10: the binary version in --data-dir; folder: one folder of PNG/JPEG images per class "
        "(or train/ and val/ folders of them) in --data-dir",
    )
    start.add_argument(
        "--val-fraction",
        type=fraction,
        help=f"--dataset folder without val/: share of each class held out for validation (default {DEFAULT_VAL})",
    )
    start.add_argument(
        "--augment", action="store_true", help="random crop (zero padding of resize/8) and horizontal flip, seeded"
    )
    start.add_argument(
        "--augment-padding",
        type=nonnegative_int,
        metavar="P",
        help="--augment: zero pixels on each side before the random crop (default resize/8; 0: flips only)",
    )
    start.add_argument(
        "--init",
        metavar="FILE",
        help="start from this weight file; a --num-classes other than the file's replaces its head",
    )
    start.add_argument(
        "--init-format", choices=INIT_FORMATS, default="canonical", help="layout of --init (peers via the converters)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress and no per-epoch lines")
    p.set_defaults(func=cmd_train)


def add_optimizer_options(p: argparse.ArgumentParser) -> None:
    """SGD's momentum, Nesterov and weight decay, and the schedule (common.training.optim; PyTorch's meaning
    in every backend, docs/training.md). The defaults are the book's: plain SGD, constant rate."""
    opt = p.add_argument_group("optimiser (PyTorch's SGD in every backend; docs/training.md)")
    opt.add_argument(
        "--momentum", type=float, default=0.0, metavar="M", help="momentum in [0, 1), e.g. 0.9 (default 0: plain SGD)"
    )
    opt.add_argument("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum)")
    opt.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        metavar="WD",
        help="L2 weight decay added to the gradient, e.g. 1e-4 (default 0)",
    )
    opt.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default="constant",
        help="constant (the book), cosine annealing to 0 over the run, or step (times --lr-gamma at each milestone)",
    )
    opt.add_argument(
        "--lr-milestones", type=positive_int_list, metavar="E1,E2", help="epochs where step drops the rate"
    )
    opt.add_argument(
        "--lr-gamma", type=float, default=0.1, metavar="G", help="step schedule's factor at each milestone"
    )
    opt.add_argument(
        "--warmup-epochs",
        type=float,
        default=0.0,
        metavar="E",
        help="linear warm-up to lr over the first epochs (default 0)",
    )


def optimizer_settings(args: argparse.Namespace) -> dict[str, object]:
    """The TrainSettings fields of :func:`add_optimizer_options` (TrainSettings checks them)."""
    return {
        "momentum": args.momentum,
        "nesterov": args.nesterov,
        "weight_decay": args.weight_decay,
        "lr_schedule": args.lr_schedule,
        "lr_milestones": tuple(args.lr_milestones or ()),
        "lr_gamma": args.lr_gamma,
        "warmup_epochs": args.warmup_epochs,
    }


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="test accuracy of a canonical weight file in any backend",
        description="Evaluates with the file's configuration, at the resize its training recorded (96 if none), on "
        "the test split of --dataset (an image folder's validation split).",
    )
    p.add_argument(
        "--weights", required=True, metavar="FILE", help="canonical weight file; with --runtime onnxruntime, an export"
    )
    p.add_argument("--backend", help=", ".join(BACKENDS) + " (not with --runtime onnxruntime)")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="framework",
        help="framework: --backend runs the weight file; onnxruntime: ONNX Runtime runs a `densenet export` "
        "directory in an onnx format",
    )
    p.add_argument("--resize", type=positive_int, help="image side (default: the file's training resize, else 96)")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH, help="images per forward pass")
    p.add_argument("--limit", type=positive_int, help="the first N test images (default: all)")
    p.add_argument(
        "--dataset",
        choices=data.DATASETS,
        default="fashion-mnist",
        help="what `densenet train --dataset` read: cifar10's binary files or an image folder in --data-dir",
    )
    p.add_argument(
        "--data-dir",
        help="the data set's directory, used as it is or refused: the four Fashion-MNIST .gz files (default: "
        "found or downloaded), CIFAR-10's .bin files, or an image folder",
    )
    p.add_argument(
        "--val-fraction",
        type=fraction,
        help="--dataset folder without val/: share of each class held out (default: the file's training's, else "
        f"{DEFAULT_VAL})",
    )
    add_precision_option(p, what="is evaluated")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_options(p, title="network the file must hold (default: whatever it holds)")
    p.set_defaults(func=cmd_evaluate)


def add_data_speed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data-speed", help="images per second of the shared input pipeline (one epoch)")
    p.add_argument("--resize", type=positive_int, default=96, help="image side after bilinear resizing")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per batch")
    p.add_argument("--limit", type=positive_int, help="the first N training images")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST .gz files (used as it is, or refused)")
    p.set_defaults(func=cmd_data_speed)


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the training curves of one or more runs in one figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG to write (default curves.png, refused if it exists)")
    p.set_defaults(func=cmd_plot)
