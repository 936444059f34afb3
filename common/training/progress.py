"""Progress of training and evaluation, for people: a live line on a terminal, one line per
epoch anywhere else (a log file, a pipe), and nothing but results with ``quiet``.

A step whose batch shape the backend has not seen yet is where JAX, TensorFlow and hybridized
MXNet compile (docs/performance.md#densenet-bench has each one's first step): the live line says
"compiling", and such steps count towards neither the speed nor the time left. Nothing here
imports a framework or a third-party package.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Training progress over ``epochs`` epochs of ``steps`` batches each (0 and 0: an evaluation).

    ``live`` (default: whether ``stream`` is a terminal) redraws one status line on ``stream``;
    otherwise only the per-epoch lines appear, on ``out``. ``quiet`` prints nothing at all.
    """

    # Redraw at most this often (seconds): a terminal needs no more, and redrawing costs time.
    REFRESH_S = 0.2

    def __init__(
        self,
        label: str,
        epochs: int,
        steps: int,
        *,
        start_epoch: int = 0,
        quiet: bool = False,
        live: bool | None = None,
        stream: TextIO | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.label, self.epochs, self.steps = label, epochs, steps
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self.quiet = quiet
        self.live = (not quiet) and (self.stream.isatty() if live is None else live)
        self.epoch = start_epoch
        self.step = 0
        self.steps_left = (epochs - start_epoch) * steps
        self.steady_s = 0.0  # time of steps that compiled nothing
        self.steady_steps = 0
        self.steady_images = 0
        self.eval_s: float | None = None  # the last evaluation's duration, for the time left
        self._shown = 0.0
        self._width = 0

    # --- what the training loop reports ---------------------------------------------------

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def before_step(self, compiling: bool) -> None:
        """Say "compiling" before a step that will compile (it can take a minute)."""
        if compiling:
            self._draw(
                f"step {self.step + 1}/{self.steps}: compiling (a new batch shape; not counted in speed or time left)",
                force=True,
            )

    def after_step(self, images: int, seconds: float, compiled: bool, loss: float, acc: float) -> None:
        self.step += 1
        self.steps_left -= 1
        if not compiled:
            self.steady_s += seconds
            self.steady_steps += 1
            self.steady_images += images
        self._draw(f"step {self.step}/{self.steps}, loss {loss:.3f}, acc {acc:.3f}{self._speed()}")

    def evaluating(self, done: int, total: int) -> None:
        self._draw(f"evaluating {done}/{total} batches", force=done == 0)

    def evaluated(self, seconds: float) -> None:
        self.eval_s = seconds

    def epoch_line(self, text: str) -> None:
        """The epoch's results: on ``out`` in every mode but quiet."""
        if self.quiet:
            return
        self._clear()
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        self._clear()

    # --- rendering ---------------------------------------------------------------------------

    def images_per_s(self) -> float | None:
        return self.steady_images / self.steady_s if self.steady_steps and self.steady_s > 0 else None

    def seconds_left(self) -> float | None:
        if not self.steady_steps:
            return None
        epochs_left = self.epochs - self.epoch - (1 if self.step >= self.steps else 0)
        evals = (self.eval_s or 0.0) * max(epochs_left, 0)
        return self.steps_left * self.steady_s / self.steady_steps + evals

    def _speed(self) -> str:
        rate, left = self.images_per_s(), self.seconds_left()
        if rate is None or left is None:
            return ""
        return f", {rate:,.0f} img/s, {format_seconds(left)} left"

    def _draw(self, status: str, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._shown < self.REFRESH_S:
            return
        self._shown = now
        where = f" epoch {self.epoch + 1}/{self.epochs}" if self.epochs else ""
        line = f"{self.label}{where}: {status}"
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        line = line[:width]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def _clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
