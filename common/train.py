"""Training on Fashion-MNIST, the same loop for every backend (the step itself is each
framework's own: ``Adapter.train_step``).

A run directory holds ``run.json`` (settings, versions and the data files read, with their
SHA-256), ``metrics.jsonl`` (one line per epoch), ``checkpoint.safetensors`` (canonical weights
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import data
from common.adapter import Adapter, Model
from common.config import DenseNetConfig, plan
from common.errors import DenseNetError, Failed, Interrupted, WeightFileError
from common.plot import PlotUnavailable, plot_runs
from common.progress import Progress
from common.registry import load_backend
from common.weights import load_canonical, save_weights


class TrainingError(DenseNetError, RuntimeError):
    """Training cannot start or go on (a run directory in the way, a checkpoint that does not fit)."""


class Diverged(TrainingError, Failed):
    """The loss (or the weights) became NaN or infinite."""


class TrainingInterrupted(TrainingError, Interrupted):
    """Ctrl-C during training; the message says what was kept."""


# What a run directory holds; a directory with any of them holds a run.
RUN_FILES = ("run.json", "metrics.jsonl", "checkpoint.safetensors", "weights.safetensors", "curves.png")


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
    # "constant" (the book) or "cosine": lr * (1 + cos(pi * step / total)) / 2, annealed every step.
    lr_schedule: str = "constant"
    # Recompute the dense layers' concatenation, BatchNorm and ReLU in the backward pass
    # (docs/performance.md): the same training, less memory, more time.
    memory_efficient: bool = False

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainingError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"the learning rate must be a finite number above 0, got {self.lr}")

    def lr_at(self, step: int, total: int) -> float:
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    # Settings a resumed run must share with the run it continues (epochs may grow).
    RESUMABLE_DIFFERENCES = ("epochs", "memory_efficient")


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
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in inference mode over a whole split; ``progress(done,
    total)`` is called before the first batch and after every batch."""
    total_loss, correct = 0.0, 0
    total = math.ceil(len(split.labels) / batch_size)
    if progress is not None:
        progress(0, total)
    for done, (X, y) in enumerate(data.batches(split, batch_size, resize, shuffle=False), start=1):
        logits = adapter.forward(model, X, compiled=adapter.prefers_compiled).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss += float(-log_p[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
        if progress is not None:
            progress(done, total)
    return total_loss / len(split.labels), correct / len(split.labels)


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
) -> list[dict[str, Any]]:
    """Train (or continue) a run; returns the metrics of every epoch.

    ``out`` must not hold a run unless ``resume`` (continue it) or ``overwrite`` (replace it).
    ``progress`` prints a live line on a terminal (``live``: force either way) and one line per
    epoch elsewhere. A NaN or infinite loss stops the run (:class:`Diverged`); Ctrl-C stops it
    (:class:`TrainingInterrupted`); both say what was kept.
    """
    # Everything the user gave is checked before a framework loads (seconds) or a file changes.
    out = check_run_dir(out, resume=resume, overwrite=overwrite)
    config = settings.config
    if config.in_channels != 1 or config.num_classes != 10:
        raise TrainingError("Fashion-MNIST needs in_channels=1 and num_classes=10")
    plan(config, settings.resize)  # refuses a resize too small for the network
    directory = data.find(data_dir)
    train_split = data.subset(data.load("train", directory), settings.limit)
    test_split = data.subset(data.load("test", directory), settings.test_limit)
    adapter = load_backend(settings.backend)

    model = adapter.build(config, seed=settings.seed, memory_efficient=settings.memory_efficient)
    metrics: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint = out / "checkpoint.safetensors"
    run = _Run(out, overwrite)
    if resume:
        found = load_canonical(checkpoint, config)
        saved = json.loads(found.metadata.get("settings", "{}"))
        differs = [
            k
            for k, v in settings.to_dict().items()
            if k not in TrainSettings.RESUMABLE_DIFFERENCES and saved.get(k) != v
        ]
        if differs:
            raise TrainingError(
                f"--resume: {checkpoint} was written with other settings ({', '.join(differs)}); "
                "resume with the same options or start a new --out"
            )
        start_epoch = int(found.metadata["epoch"])
        try:
            metrics = read_metrics_file(out / "metrics.jsonl", start_epoch)
        except TrainingError as exc:
            raise TrainingError(
                f"--resume: {exc}; the checkpoint holds epoch {start_epoch} and its metrics are needed to go on "
                "(restore the file, or start again with --overwrite)"
            ) from None
        adapter.set_weights(model, found.weights)
        run.checkpoint_epoch = start_epoch
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    run_info = {
        "settings": settings.to_dict(),
        "framework": adapter.framework,
        "version": adapter.version(),
        "data": {"dir": str(directory.resolve()), "files": data.files_used(directory)},
    }

    steps = math.ceil(len(train_split.labels) / settings.batch_size)
    bar = Progress(adapter.name, settings.epochs, steps, start_epoch=start_epoch, quiet=not progress, live=live)
    shapes: set[tuple[str, int]] = set()  # (phase, batch size) seen: a new one compiles
    epoch, step, lr = start_epoch, 0, settings.lr
    try:
        for epoch in range(start_epoch, settings.epochs):
            bar.start_epoch(epoch)
            started, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            steady_images, steady_s, compile_s = 0, 0.0, 0.0
            batches = data.batches(train_split, settings.batch_size, settings.resize, seed=settings.seed, epoch=epoch)
            for step, (X, y) in enumerate(batches):
                lr = settings.lr_at(epoch * steps + step, settings.epochs * steps)
                compiling = ("train", len(y)) not in shapes
                shapes.add(("train", len(y)))
                bar.before_step(compiling)
                t0 = time.perf_counter()
                loss, logits = adapter.train_step(model, X, y, lr, compiled=adapter.prefers_compiled)
                seconds = time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise Diverged(_diverged(loss, epoch, step, lr, run))
                seen += len(y)
                loss_sum += loss * len(y)
                correct += int((logits.argmax(axis=1) == y).sum())
                if compiling:
                    compile_s += seconds
                else:
                    steady_images, steady_s = steady_images + len(y), steady_s + seconds
                bar.after_step(len(y), seconds, compiling, loss_sum / seen, correct / seen)
            t0 = time.perf_counter()
            test_loss, test_acc = evaluate(adapter, model, test_split, 256, settings.resize, bar.evaluating)
            bar.evaluated(time.perf_counter() - t0)
            if not math.isfinite(test_loss):
                raise Diverged(_diverged(test_loss, epoch, step, lr, run, shown_by="test loss"))
            try:
                weights = adapter.get_weights(model)
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
            run.first_write(run_info)
            _write_atomic(out / "metrics.jsonl", metrics_text(metrics))
            save_weights(
                checkpoint,
                weights,
                config,
                source=adapter.name,
                extra_metadata={"epoch": str(epoch + 1), "settings": json.dumps(settings.to_dict())},
            )
            run.checkpoint_epoch = epoch + 1
            m = metrics[-1]
            compiling = f"compiling took {compile_s:.0f} s" if compile_s >= 1 else ""
            bar.epoch_line(
                f"{adapter.name} epoch {epoch + 1}/{settings.epochs}: train loss {m['train_loss']:.4f} "
                f"acc {m['train_acc']:.4f}, test loss {test_loss:.4f} acc {test_acc:.4f}, "
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
    save_weights(
        out / "weights.safetensors",
        adapter.get_weights(model),
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
