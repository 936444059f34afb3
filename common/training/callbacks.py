"""What a training run does around the engine's loop: show progress, record steps, write files."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from common.config import DenseNetConfig
from common.training.engine import Callback, EpochEnd, StepEnd
from common.training.progress import Progress
from common.training.rundir import RunDir, metrics_text

__all__ = ["Checkpointer", "EpochLines", "ProgressCallback", "StepRecorder", "speed"]


def speed(images_per_s: float | None, note: str = "") -> str:
    """``1,105 img/s`` (with a note in parentheses), or why there is no figure."""
    if images_per_s is None:
        return "speed not measured (every step was a first, compiling one" + (f"; {note})" if note else ")")
    return f"{images_per_s:,.0f} img/s" + (f" ({note})" if note else "")


def epoch_line(label: str, epochs: int, test_name: str, m: dict[str, Any]) -> str:
    """``torch epoch 1/3: train loss ... acc ..., test loss ... acc ..., 1,105 img/s``."""
    compiling = f"compiling took {m['compile_s']:.0f} s" if m["compile_s"] >= 1 else ""
    return (
        f"{label} epoch {m['epoch']}/{epochs}: train loss {m['train_loss']:.4f} "
        f"acc {m['train_acc']:.4f}, {test_name} loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}, "
        + speed(m["images_per_s"], compiling)
    )


class ProgressCallback(Callback):
    """The live line and the per-epoch lines of :class:`common.training.progress.Progress`."""

    def __init__(self, bar: Progress, test_name: str) -> None:
        self.bar, self.test_name = bar, test_name

    def on_epoch_begin(self, epoch: int) -> None:
        self.bar.start_epoch(epoch)

    def before_step(self, compiling: bool) -> None:
        self.bar.before_step(compiling)

    def on_step_end(self, step: StepEnd, loss_so_far: float, acc_so_far: float) -> None:
        self.bar.after_step(step.images, step.seconds, step.compiling, loss_so_far, acc_so_far)

    def on_evaluate(self, done: int, total: int) -> None:
        self.bar.evaluating(done, total)

    def on_evaluated(self, seconds: float) -> None:
        self.bar.evaluated(seconds)

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.bar.epoch_line(epoch_line(self.bar.label, self.bar.epochs, self.test_name, end.metrics))

    def on_close(self) -> None:
        self.bar.close()


class EpochLines(Callback):
    """Each epoch's results handed to ``say`` (an exercise's own progress)."""

    def __init__(self, say: Callable[[dict[str, Any]], None]) -> None:
        self.say = say

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.say(end.metrics)


class StepRecorder(Callback):
    """Every step's loss and rate (``steps.jsonl``), after the ones a resumed run already had."""

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records = list(records or [])

    def on_step_end(self, step: StepEnd, loss_so_far: float, acc_so_far: float) -> None:
        self.records.append({"epoch": step.epoch + 1, "step": step.step + 1, "loss": step.loss, "lr": step.lr})


class Checkpointer(Callback):
    """After every epoch: ``run.json`` (the first time), ``metrics.jsonl``, ``steps.jsonl`` and the
    atomic ``checkpoint.safetensors`` with the velocities, by the writer only; every worker then
    knows which epoch the checkpoint holds."""

    def __init__(
        self,
        rundir: RunDir,
        run_info: dict[str, Any],
        overwrite: bool,
        config: DenseNetConfig,
        metrics: list[dict[str, Any]],
        steps: StepRecorder,
    ) -> None:
        self.rundir, self.run_info, self.overwrite, self.config = rundir, run_info, overwrite, config
        self.metrics, self.steps = list(metrics), steps
        settings = run_info["settings"]
        self.metadata = {"settings": json.dumps(settings), "data": str(run_info["data"]["sha256"])}
        self.source = settings["backend"]

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.metrics.append(end.metrics)
        if self.rundir.writer:
            self.rundir.begin(self.run_info, self.overwrite)
            self.rundir.write_text("metrics.jsonl", metrics_text(self.metrics))
            self.rundir.write_text("steps.jsonl", metrics_text(self.steps.records))
            self.rundir.save(
                self.rundir.checkpoint.name,
                end.weights,
                self.config,
                source=self.source,
                extra_metadata={**self.metadata, "epoch": str(end.epoch + 1), "step": str(end.step)},
                optimizer_state=end.optimizer_state(),
            )
        self.rundir.checkpoint_epoch = end.epoch + 1
