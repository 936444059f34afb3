"""Training on Fashion-MNIST, CIFAR-10 or an image folder, the same loop for every backend (the
step itself is each framework's own: ``Adapter.train_step``).

A run directory holds ``run.json`` (settings, versions, the data read with SHA-256s, the starting
weights), ``metrics.jsonl`` (one line per epoch), ``steps.jsonl`` (one line per training step:
its loss and learning rate), ``checkpoint.safetensors`` (canonical weights
after the last finished epoch, written atomically), ``weights.safetensors`` (the final weights,
loadable by any backend) and ``curves.png``. Nothing is written before the first epoch finishes,
and a directory that holds a run is never replaced unless asked (``overwrite``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from common import data
from common.adapter import Adapter, Model
from common.bench import allocator
from common.config import DenseNetConfig, plan
from common.distributed.group import Group
from common.distributed.sharding import check_divisible, shard_range
from common.errors import DenseNetError, Failed, Interrupted, WeightFileError
from common.optim import SGD, LRSchedule, OptimizerError
from common.plot import PlotUnavailable, plot_runs
from common.progress import Progress
from common.registry import load_backend
from common.starting_weights import FORMATS as INIT_FORMATS
from common.starting_weights import starting_weights
from common.weights import load_canonical, save_weights


class TrainingError(DenseNetError, RuntimeError):
    """Training cannot start or go on (a run directory in the way, a checkpoint that does not fit)."""


class Diverged(TrainingError, Failed):
    """The loss (or the weights) became NaN or infinite."""


class TrainingInterrupted(TrainingError, Interrupted):
    """Ctrl-C during training; the message says what was kept."""


# What a run directory holds; a directory with any of them holds a run.
RUN_FILES = ("run.json", "metrics.jsonl", "steps.jsonl", "checkpoint.safetensors", "weights.safetensors", "curves.png")


# The distributed groups build the standard network; say so rather than train it silently.
MEMORY_EFFICIENT_ALONE = (
    "--memory-efficient trains in one process only so far; drop --workers/--distributed or --memory-efficient"
)


@dataclass
class TrainSettings:
    """The book's recipe by default: batch 128, plain SGD at 0.01, 10 epochs, 96x96."""

    backend: str
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    resize: int = 96
    limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    config: DenseNetConfig = field(default_factory=DenseNetConfig)
    # The optimiser and the schedule (common.optim, docs/training.md "The optimiser"): SGD in
    # PyTorch's meaning; "constant" (the book), "cosine" (annealed every step) or "step" (times
    # lr_gamma at each of lr_milestones, epochs), after a linear warm-up of warmup_epochs.
    lr_schedule: str = "constant"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0

    # Data and starting weights: the data set (common.data.DATASETS; an image folder's validation
    # fraction, None: its default or its val/ folder), random crop and flip (common.data.augment),
    # and a weight file to start from (its layout: canonical or a peer's; common.starting_weights).
    dataset: str = "fashion-mnist"
    val_fraction: float | None = None
    augment: bool = False
    # Zero pixels on each side before the random crop (None: resize // 8; 0: flips only).
    augment_padding: int | None = None
    init: str | None = None
    init_format: str = "canonical"
    # Data-parallel workers (common.distributed): batch_size stays the global batch.
    workers: int = 1
    # BatchNorm statistics over the global batch (the engines that have it) instead of per worker.
    sync_bn: bool = False
    # Recompute the dense layers' concatenation, BatchNorm and ReLU in the backward pass
    # (docs/performance.md): the same training, less memory, more time.
    memory_efficient: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in data.DATASETS:
            raise TrainingError(f"dataset must be one of {', '.join(data.DATASETS)}, got {self.dataset!r}")
        if self.init_format not in INIT_FORMATS:
            raise TrainingError(f"init_format must be one of {', '.join(INIT_FORMATS)}, got {self.init_format!r}")
        if self.init is not None:
            self.init = os.fspath(self.init)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"the learning rate must be a finite number above 0, got {self.lr}")
        self.lr_milestones = tuple(self.lr_milestones)
        try:
            self.sgd  # noqa: B018  (validates)
            self.schedule.check(self.epochs)
        except OptimizerError as exc:
            raise TrainingError(str(exc)) from None
        if self.augment_padding is not None:
            if not self.augment:
                raise TrainingError("the augmentation padding needs augmentation on (--augment)")
            if not 0 <= self.augment_padding <= self.resize:
                raise TrainingError(
                    f"the augmentation padding must be 0 to the image side ({self.resize}) pixels,"
                    f" got {self.augment_padding}"
                )
        if self.memory_efficient and self.workers > 1:
            raise TrainingError(MEMORY_EFFICIENT_ALONE)

    @property
    def sgd(self) -> SGD:
        return SGD(self.momentum, self.nesterov, self.weight_decay)

    @property
    def schedule(self) -> LRSchedule:
        return LRSchedule(self.lr_schedule, self.lr_milestones, self.lr_gamma, self.warmup_epochs)

    def lr_at(self, step: int, total: int) -> float:
        """The rate of step ``step`` of ``total`` (``epochs`` epochs of equal length)."""
        return self.schedule.lr_at(self.lr, step, max(total // self.epochs, 1), self.epochs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def default_of(cls, name: str) -> Any:
        """A field's default as ``to_dict`` writes it (for checkpoints written before the field)."""
        f = next(f for f in fields(cls) if f.name == name)
        value = f.default_factory() if f.default_factory is not MISSING else f.default
        return list(value) if isinstance(value, tuple) else value

    # Settings a resumed run must share with the run it continues (epochs may grow; the workers
    # may change, since the global batches are the same for any number of them, and so may the
    # memory-efficient mode, which computes the same training).
    RESUMABLE_DIFFERENCES = ("epochs", "workers", "memory_efficient")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN or infinity; Python's json would write a bare NaN, which no parser accepts.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def metrics_text(metrics: list[dict[str, Any]]) -> str:
    """``metrics.jsonl``: one JSON object per epoch, non-finite numbers as null."""
    return "".join(json.dumps({k: _finite_or_none(v) for k, v in m.items()}, allow_nan=False) + "\n" for m in metrics)


def read_metrics_file(path: Path, epochs: int | None = None) -> list[dict[str, Any]]:
    """The per-epoch metrics of ``path`` (the first ``epochs`` of them, which must all be there).

    A missing file, a line that is not a JSON object (a truncated write) or too few epochs is a
    :class:`TrainingError` that names the file and the line.
    """
    if not path.is_file():
        raise TrainingError(f"{path} does not exist")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path} cannot be read ({exc})") from None
    metrics = []
    for number, line in enumerate(lines[:epochs] if epochs is not None else lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise TrainingError(f"{path} line {number} is not valid JSON (a truncated file?): {line[:60]!r}") from None
        if not isinstance(value, dict) or "epoch" not in value:
            raise TrainingError(f"{path} line {number} is not an epoch's metrics: {line[:60]!r}")
        metrics.append(value)
    if epochs is not None and len(metrics) < epochs:
        raise TrainingError(f"{path} holds {len(metrics)} epoch(s), expected {epochs}")
    return metrics


def read_steps_file(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The per-step records of the first ``epochs`` epochs in ``path`` (none if there is no file:
    a run written before steps were recorded)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            raise TrainingError(f"{path} line {number} is not valid JSON (a truncated file?): {line[:60]!r}") from None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= epochs:
            records.append(record)
    return records


def _augment_info(settings: TrainSettings) -> dict[str, Any] | None:
    if not settings.augment:
        return None
    pad = data.padding(settings.resize) if settings.augment_padding is None else settings.augment_padding
    return {
        "order": "scale to [0, 1], channels, resize, zero-pad, random crop, horizontal flip",
        "padding": pad,
        "crop": settings.resize,
        "flip_probability": 0.5,
        "seeded_by": "(seed, epoch, index of the example)",
    }


def run_files(out: Path) -> list[str]:
    """The run artefacts ``out`` already holds."""
    return [name for name in RUN_FILES if (out / name).exists()]


def _describe_run(out: Path) -> str:
    try:
        settings = json.loads((out / "run.json").read_text())["settings"]
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
        return f"a {settings['backend']} run of {sum(1 for line in lines if line.strip())} epoch(s)"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run"


def check_run_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse an ``out`` that training would have to destroy or cannot write, before any work.

    A directory that already holds a run is continued (``resume``), replaced (``overwrite``) or
    refused; a file, or a path that cannot be created or written, is refused.
    """
    out = Path(out)
    if resume and overwrite:
        raise TrainingError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory; name a directory for the run")
    if resume:
        if not (out / "checkpoint.safetensors").is_file():
            raise TrainingError(
                f"--resume: {out / 'checkpoint.safetensors'} does not exist (no epoch of a run there finished)"
            )
    elif not overwrite:
        found = run_files(out) if out.is_dir() else []
        if found:
            raise TrainingError(
                f"{out} already holds {_describe_run(out)} ({', '.join(found)}); continue it with --resume, "
                "train into a new --out, or replace it with --overwrite"
            )
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TrainingError(f"--out {out}: {parent} is not a directory this user can write in")
    return out


def evaluate(
    adapter: Adapter,
    model: Model,
    split: data.Split,
    batch_size: int,
    resize: int,
    progress: Callable[[int, int], None] | None = None,
    channels: int | None = None,
    group: Group | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in inference mode over a whole split (images converted to
    ``channels``); ``progress(done, total)`` is called before the first batch and after every batch.
    With a ``group``, each worker evaluates its share of the split and the sums are added up over
    the workers."""
    count = len(split.labels)
    if group is not None:
        start, stop = shard_range(count, group.rank, group.world)
        split = data.Split(split.images[start:stop], split.labels[start:stop])
    total_loss, correct = 0.0, 0
    total = math.ceil(len(split.labels) / batch_size)
    if progress is not None:
        progress(0, total)
    for done, (X, y) in enumerate(data.batches(split, batch_size, resize, shuffle=False, channels=channels), start=1):
        if group is not None:
            logits = group.forward(adapter, model, X).astype(np.float64)
        else:
            logits = adapter.forward(model, X, compiled=adapter.prefers_compiled).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss += float(-log_p[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
        if progress is not None:
            progress(done, total)
    if group is not None:
        total_loss, correct = group.sum(np.array([total_loss, correct], np.float64))
    return total_loss / count, correct / count


class _Run:
    """What one call of :func:`train` has written so far, to say honestly what is kept when it stops.

    Nothing is written until the first epoch finishes: a run stopped before then leaves the
    directory as it was (an earlier run that ``overwrite`` would replace included).
    """

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out, self.overwrite = out, overwrite
        self.created_dir = not out.exists()
        self.checkpoint_epoch: int | None = None  # the epoch the checkpoint holds, if there is one
        self.wrote = False  # whether this call has written anything in out yet

    def kept(self) -> str:
        checkpoint = self.out / "checkpoint.safetensors"
        if self.checkpoint_epoch:
            return f"{checkpoint} holds the weights after epoch {self.checkpoint_epoch}"
        if self.overwrite and run_files(self.out):
            return f"no epoch finished, so nothing was written: the run in {self.out} is as it was"
        return f"no epoch finished, so nothing was kept in {self.out}"

    def first_write(self, run_info: dict[str, Any]) -> None:
        """Before the first epoch's files: replace an earlier run (``overwrite``), write run.json."""
        if self.wrote:
            return
        if self.overwrite:
            for name in run_files(self.out):  # only the artefacts of a run: nothing else the directory holds
                (self.out / name).unlink()
        _write_atomic(self.out / "run.json", json.dumps(run_info, indent=2) + "\n")
        self.wrote = True

    def discard(self) -> None:
        """Remove the directory this call made, if nothing was written in it."""
        if not self.wrote and self.created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


def train(
    settings: TrainSettings,
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    live: bool | None = None,
    group: Group | None = None,
) -> list[dict[str, Any]]:
    """Train (or continue) a run; returns the metrics of every epoch.

    ``out`` must not hold a run unless ``resume`` (continue it) or ``overwrite`` (replace it).
    ``progress`` prints a live line on a terminal (``live``: force either way) and one line per
    epoch elsewhere. A NaN or infinite loss stops the run (:class:`Diverged`); Ctrl-C stops it
    (:class:`TrainingInterrupted`); both say what was kept.

    ``group``: this process is one worker of a data-parallel run (``common.distributed``); the
    workers step together on their shards of every global batch, and worker 0 alone writes.
    """
    # Everything the user gave is checked before a framework loads (seconds) or a file changes.
    out = check_run_dir(out, resume=resume, overwrite=overwrite)
    config = settings.config
    plan(config, settings.resize)  # refuses a resize too small for the network
    dataset = data.open_dataset(
        settings.dataset,
        data_dir,
        channels=config.in_channels,
        size=settings.resize,
        val_fraction=settings.val_fraction,
    )
    if config.num_classes != dataset.num_classes:
        shown = ", ".join(dataset.classes[:5]) + (", ..." if dataset.num_classes > 5 else "")
        raise TrainingError(
            f"{dataset.name} has {dataset.num_classes} classes ({shown}), the network "
            f"num_classes={config.num_classes}: pass --num-classes {dataset.num_classes}"
            + (" (the --init file's head is then replaced)" if settings.init else "")
        )
    train_split = data.subset(dataset.train, settings.limit)
    test_split = data.subset(dataset.test, settings.test_limit)
    start = (
        starting_weights(settings.init, settings.init_format, config, settings.seed)
        if settings.init is not None and not resume
        else None
    )
    for note in (dataset.channel_note(config.in_channels), start.notice if start else None):
        if note:
            print(f"note: {note}", file=sys.stderr)
    adapter = load_backend(settings.backend)
    writer = group is None or group.writer
    if group is not None:
        if settings.memory_efficient:
            raise TrainingError(MEMORY_EFFICIENT_ALONE)
        check_divisible(settings.batch_size, group.replicas)
        model = group.build(adapter, config, seed=settings.seed, sync_bn=settings.sync_bn)
    else:
        model = adapter.build(config, seed=settings.seed, memory_efficient=settings.memory_efficient)
    if start is not None:
        if group is not None:
            group.set_weights(adapter, model, start.weights)
        else:
            adapter.set_weights(model, start.weights)
    metrics: list[dict[str, Any]] = []
    step_records: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint = out / "checkpoint.safetensors"
    run = _Run(out, overwrite)
    run.created_dir = run.created_dir and writer  # only worker 0 makes, writes or removes the directory
    if resume:
        found = load_canonical(checkpoint, config)
        saved = json.loads(found.metadata.get("settings", "{}"))
        differs = [
            k
            for k, v in settings.to_dict().items()
            if k not in TrainSettings.RESUMABLE_DIFFERENCES and saved.get(k, TrainSettings.default_of(k)) != v
        ]
        if differs:
            raise TrainingError(
                f"--resume: {checkpoint} was written with other settings ({', '.join(differs)}); "
                "resume with the same options or start a new --out"
            )
        if found.metadata.get("data", dataset.info["sha256"]) != dataset.info["sha256"]:
            raise TrainingError(
                f"--resume: the run trained on other {dataset.name} data than {dataset.info['dir']} holds now "
                "(another directory, or changed files); resume with the same data or start a new --out"
            )
        start_epoch = int(found.metadata["epoch"])
        velocities = found.optimizer_state
        try:
            metrics = read_metrics_file(out / "metrics.jsonl", start_epoch)
        except TrainingError as exc:
            raise TrainingError(
                f"--resume: {exc}; the checkpoint holds epoch {start_epoch} and its metrics are needed to go on "
                "(restore the file, or start again with --overwrite)"
            ) from None
        step_records = read_steps_file(out / "steps.jsonl", start_epoch)
        if group is not None:
            group.set_weights(adapter, model, found.weights)
        else:
            adapter.set_weights(model, found.weights)
        recorded_step = found.metadata.get("step")  # absent from checkpoints before the optimiser options
        run.checkpoint_epoch = start_epoch
    try:
        if writer:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    run_info = {
        "settings": settings.to_dict(),
        "framework": adapter.framework,
        "version": adapter.version(),
        "malloc": allocator.in_use(),
        **allocator.engine_record(settings.backend),
        "data": {**dataset.info, "evaluated_on": dataset.test_name, "augment": _augment_info(settings)},
        "init": start.record if start is not None else None,
    }
    if resume:  # the starting weights are the first run's: keep its record of them
        try:
            run_info["init"] = json.loads((out / "run.json").read_text()).get("init")
        except (OSError, ValueError, AttributeError):
            pass

    world = group.world if group is not None else 1
    shard = (group.rank, group.world) if group is not None else None
    # Steps in an epoch: global batches with at least one image per worker (data.batches' shard).
    steps = sum(
        1
        for first in range(0, len(train_split.labels), settings.batch_size)
        if min(settings.batch_size, len(train_split.labels) - first) >= (group.replicas if group else 1)
    )
    adapter.configure_optimizer(model, settings.sgd)
    if resume:
        # The schedule goes on from the step the checkpoint records; the velocities go on as saved.
        resumed_step = int(recorded_step) if recorded_step is not None else start_epoch * steps
        if resumed_step != start_epoch * steps:
            raise TrainingError(
                f"--resume: {checkpoint} stopped at step {resumed_step}, but epoch {start_epoch} of this data ends at "
                f"step {start_epoch * steps}; resume with the same data and options or start a new --out"
            )
        if settings.sgd.has_state and not velocities:
            raise TrainingError(
                f"--resume: {checkpoint} holds no momentum velocities to continue {settings.sgd.describe()}"
            )
        if group is not None:  # every worker loads the same velocities
            group.set_optimizer_state(adapter, model, velocities)
        else:
            adapter.set_optimizer_state(model, velocities)
    quiet = not (progress and writer)
    bar = Progress(adapter.name, settings.epochs, steps, start_epoch=start_epoch, quiet=quiet, live=live)
    shapes: set[tuple[str, int]] = set()  # (phase, batch size) seen: a new one compiles
    epoch, step, lr = start_epoch, 0, settings.lr
    try:
        for epoch in range(start_epoch, settings.epochs):
            bar.start_epoch(epoch)
            started, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            steady_images, steady_s, compile_s = 0, 0.0, 0.0
            batches = data.batches(
                train_split,
                settings.batch_size,
                settings.resize,
                seed=settings.seed,
                epoch=epoch,
                augment=settings.augment,
                augment_padding=settings.augment_padding,
                channels=config.in_channels,
                shard=shard,
            )
            for step, (X, y) in enumerate(batches):
                lr = settings.lr_at(epoch * steps + step, settings.epochs * steps)
                compiling = ("train", len(y)) not in shapes
                shapes.add(("train", len(y)))
                bar.before_step(compiling)
                t0 = time.perf_counter()
                if group is not None:  # the loss of the whole global batch, the same on every worker
                    loss, logits = group.train_step(adapter, model, X, y, lr)
                else:
                    loss, logits = adapter.train_step(model, X, y, lr, compiled=adapter.trains_compiled(model))
                seconds = time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise Diverged(_diverged(loss, epoch, step, lr, run))
                step_records.append({"epoch": epoch + 1, "step": step + 1, "loss": loss, "lr": lr})
                seen += len(y)
                loss_sum += loss * len(y)
                correct += int((logits.argmax(axis=1) == y).sum())
                if compiling:
                    compile_s += seconds
                else:
                    steady_images, steady_s = steady_images + len(y), steady_s + seconds
                bar.after_step(len(y), seconds, compiling, loss_sum / seen, correct / seen)
            if group is not None:  # this worker's accuracy so far -> the whole run's
                correct = int(group.sum(np.array([correct], np.float64))[0])
                seen, steady_images = seen * world, steady_images * world
                loss_sum *= world
            t0 = time.perf_counter()
            test_loss, test_acc = evaluate(
                adapter,
                model,
                test_split,
                256,
                settings.resize,
                bar.evaluating,
                channels=config.in_channels,
                group=group,
            )
            bar.evaluated(time.perf_counter() - t0)
            if not math.isfinite(test_loss):
                raise Diverged(_diverged(test_loss, epoch, step, lr, run, shown_by="test loss"))
            try:
                weights = group.get_weights(adapter, model) if group is not None else adapter.get_weights(model)
            except WeightFileError:  # non-finite weights: the last updates diverged
                raise Diverged(_diverged("non-finite", epoch, step, lr, run, shown_by="weights")) from None
            metrics.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / seen,
                    "train_acc": correct / seen,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    # Steps that compiled (a new batch shape) are left out of the speed (None when every
                    # step did): their time is compile_s.
                    "images_per_s": steady_images / steady_s if steady_s > 0 else None,
                    "compile_s": compile_s,
                    "seconds": time.perf_counter() - started,
                }
            )
            if writer:
                run.first_write(run_info)
                _write_atomic(out / "metrics.jsonl", metrics_text(metrics))
                _write_atomic(out / "steps.jsonl", metrics_text(step_records))
                save_weights(
                    checkpoint,
                    weights,
                    config,
                    source=adapter.name,
                    extra_metadata={
                        "epoch": str(epoch + 1),
                        "step": str((epoch + 1) * steps),  # where the schedule goes on from
                        "settings": json.dumps(settings.to_dict()),
                        "data": str(dataset.info["sha256"]),
                    },
                    optimizer_state=(
                        group.get_optimizer_state(adapter, model)
                        if group is not None
                        else adapter.get_optimizer_state(model)
                    ),
                )
            run.checkpoint_epoch = epoch + 1
            m = metrics[-1]
            compiling = f"compiling took {compile_s:.0f} s" if compile_s >= 1 else ""
            bar.epoch_line(
                f"{adapter.name} epoch {epoch + 1}/{settings.epochs}: train loss {m['train_loss']:.4f} "
                f"acc {m['train_acc']:.4f}, {dataset.test_name} loss {test_loss:.4f} acc {test_acc:.4f}, "
                + speed(m["images_per_s"], compiling)
            )
    except KeyboardInterrupt:
        bar.close()
        run.discard()
        again = (
            "continue with the same command and --resume"
            if run.checkpoint_epoch
            else "start again with the same command"
        )
        raise TrainingInterrupted(f"interrupted in epoch {epoch + 1}; {run.kept()} ({again})") from None
    except BaseException:
        bar.close()
        run.discard()
        raise
    bar.close()
    final = group.get_weights(adapter, model) if group is not None else adapter.get_weights(model)
    if not writer:
        return metrics
    save_weights(
        out / "weights.safetensors",
        final,
        config,
        source=adapter.name,
        extra_metadata={"epoch": str(len(metrics)), "settings": json.dumps(settings.to_dict())},
    )
    try:
        plot_runs([out], out / "curves.png")
    except PlotUnavailable as exc:
        print(f"note: {out / 'curves.png'} not drawn: {exc}", file=sys.stderr)
    return metrics


def speed(images_per_s: float | None, note: str = "") -> str:
    """``1,105 img/s`` (with a note in parentheses), or why there is no figure."""
    if images_per_s is None:
        return "speed not measured (every step was a first, compiling one" + (f"; {note})" if note else ")")
    return f"{images_per_s:,.0f} img/s" + (f" ({note})" if note else "")


def _diverged(value: float | str, epoch: int, step: int, lr: float, run: _Run, shown_by: str | None = None) -> str:
    """The one message of a diverged run: ``the loss became nan at epoch E, step S`` and what was kept."""
    cause = f": the epoch's last update made the {shown_by} {value}" if shown_by else ""
    kept = run.kept()
    return (
        f"the loss became {value} at epoch {epoch + 1}, step {step + 1} (learning rate {lr:g}){cause}; "
        f"stopped instead of training on garbage. {kept[0].upper() + kept[1:]}; "
        "try a lower --lr (in a new --out, or with --overwrite)"
    )
