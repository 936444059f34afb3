"""The one training loop: one process or one worker of N, the same code.

One process is a group of one (:class:`LocalGroup`): the engine only ever talks to a
:class:`~common.distributed.group.Group`, whose ``train_step`` is the framework's own step
(alone, or on the engine's distributed collective). What a run does besides stepping (a
progress line, files, curves) is a :class:`Callback`; the loop itself writes nothing. The
training command (:mod:`common.training.run`), the pooling exercise and parity's lockstep
steps all run through :class:`Engine`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import data
from common.adapter import Adapter, Model
from common.config import DenseNetConfig
from common.distributed.group import Group
from common.distributed.sharding import shard_range
from common.errors import WeightFileError
from common.process import lifeline

__all__ = ["Callback", "Engine", "EpochEnd", "LocalGroup", "NonFinite", "StepEnd", "evaluate", "score"]

EVAL_BATCH = 256


class LocalGroup(Group):
    """This process alone: rank 0 of 1, the adapter's own step, nothing to communicate.

    ``compiled``: step through the compiled path (None: what ``densenet train`` uses,
    ``adapter.trains_compiled``); ``memory_efficient``: build the recomputing network;
    ``precision``: build it in that precision (``"bfloat16"``: mixed precision).
    """

    rank, world, replicas = 0, 1, 1

    def __init__(
        self,
        adapter: Adapter,
        *,
        compiled: bool | None = None,
        memory_efficient: bool = False,
        precision: str = "float32",
    ) -> None:
        self.backend = adapter.name
        self.compiled = compiled
        self.memory_efficient = memory_efficient
        self.precision = precision

    def build(
        self, adapter: Adapter, config: DenseNetConfig, seed: int = 0, dtype: str = "float32", sync_bn: bool = False
    ) -> Model:
        # One process holds the whole batch: its BatchNorm is already synchronised.
        return adapter.build(
            config, seed=seed, dtype=dtype, memory_efficient=self.memory_efficient, precision=self.precision
        )

    def train_step(
        self, adapter: Adapter, model: Model, X: np.ndarray, y: np.ndarray, lr: float
    ) -> tuple[float, np.ndarray]:
        compiled = adapter.trains_compiled(model) if self.compiled is None else self.compiled
        return adapter.train_step(model, X, y, lr, compiled=compiled)

    def set_weights(self, adapter: Adapter, model: Model, weights: dict[str, np.ndarray]) -> None:
        adapter.set_weights(model, weights)

    def get_weights(self, adapter: Adapter, model: Model) -> dict[str, np.ndarray]:
        return adapter.get_weights(model)

    def forward(self, adapter: Adapter, model: Model, X: np.ndarray) -> np.ndarray:
        return adapter.forward(model, X, compiled=adapter.prefers_compiled if self.compiled is None else self.compiled)

    def sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def close(self) -> None:
        pass


class NonFinite(Exception):
    """A loss, test loss or weights that became NaN or infinite (the caller words the message)."""

    def __init__(self, value: float | str, epoch: int, step: int, lr: float, shown_by: str | None = None) -> None:
        super().__init__(f"{value} at epoch {epoch + 1}, step {step + 1}")
        self.value, self.epoch, self.step, self.lr, self.shown_by = value, epoch, step, lr, shown_by


@dataclass
class StepEnd:
    """One finished step: ``epoch`` and ``step`` count from 0, ``loss`` is the global batch's."""

    epoch: int
    step: int
    lr: float
    loss: float
    images: int
    correct: int
    seconds: float
    compiling: bool


@dataclass
class EpochEnd:
    """One finished epoch: its metrics (``metrics.jsonl``'s line) and what to checkpoint."""

    epoch: int
    metrics: dict[str, Any]
    weights: dict[str, np.ndarray]
    step: int  # steps done so far, where the schedule goes on from
    optimizer_state: Callable[[], dict[str, np.ndarray]] = field(repr=False, default=dict)


class Callback:
    """What a run does around the loop. Every method is optional; the engine calls them in order."""

    def on_epoch_begin(self, epoch: int) -> None: ...

    def before_step(self, compiling: bool) -> None: ...

    def on_step_end(self, step: StepEnd, loss_so_far: float, acc_so_far: float) -> None: ...

    def on_evaluate(self, done: int, total: int) -> None: ...

    def on_evaluated(self, seconds: float) -> None: ...

    def on_epoch_end(self, end: EpochEnd) -> None: ...

    def on_close(self) -> None: ...


@dataclass
class _Tally:
    """An epoch's running sums; steps that compiled count in neither the speed nor its time."""

    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    steady_images: int = 0
    steady_s: float = 0.0
    compile_s: float = 0.0

    def add(self, s: StepEnd) -> None:
        self.seen += s.images
        self.loss_sum += s.loss * s.images
        self.correct += s.correct
        if s.compiling:
            self.compile_s += s.seconds
        else:
            self.steady_images, self.steady_s = self.steady_images + s.images, self.steady_s + s.seconds


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
    ``channels``); ``progress(done, total)`` is called before the first batch and after every
    batch. With a ``group`` (default: this process alone), each worker evaluates its share and
    the sums are added up over the workers."""
    group = group or LocalGroup(adapter)
    count = len(split.labels)
    start, stop = shard_range(count, group.rank, group.world)
    share = data.Split(split.images[start:stop], split.labels[start:stop])
    sums = score(lambda X: group.forward(adapter, model, X), share, batch_size, resize, progress, channels)
    total_loss, correct = group.sum(np.array(sums, np.float64))
    return total_loss / count, correct / count


def score(
    logits_of: Callable[[np.ndarray], np.ndarray],
    split: data.Split,
    batch_size: int,
    resize: int,
    progress: Callable[[int, int], None] | None = None,
    channels: int | None = None,
) -> tuple[float, int]:
    """The summed cross-entropy and the number of right answers of ``logits_of`` (NCHW float32
    batch -> logits) over ``split``; what :func:`evaluate` adds up, for any runtime."""
    total_loss, correct = 0.0, 0
    total = math.ceil(len(split.labels) / batch_size)
    if progress is not None:
        progress(0, total)
    for done, (X, y) in enumerate(data.batches(split, batch_size, resize, shuffle=False, channels=channels), start=1):
        lifeline.check()
        logits = np.asarray(logits_of(X)).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss += float(-log_p[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
        if progress is not None:
            progress(done, total)
    return total_loss, correct


class Engine:
    """Steps ``model`` through ``group`` at the rate ``lr_at(global step)``.

    ``check_finite``: a non-finite loss, test loss or weights raises :class:`NonFinite` (a
    training run stops); off, the losses are returned as they are (parity compares them).
    """

    def __init__(
        self,
        group: Group,
        adapter: Adapter,
        model: Model,
        lr_at: Callable[[int], float],
        callbacks: Sequence[Callback] = (),
        *,
        check_finite: bool = True,
    ) -> None:
        self.group, self.adapter, self.model = group, adapter, model
        self.lr_at = lr_at
        self.callbacks = list(callbacks)
        self.check_finite = check_finite
        self._batch_sizes: set[int] = set()  # a training batch size not seen yet compiles

    def _emit(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(*args)

    def step(self, epoch: int, step: int, global_step: int, X: np.ndarray, y: np.ndarray) -> StepEnd:
        """One step of the group's training step; the callbacks hear of it before and after."""
        lifeline.check()  # a signal a framework's finalizer swallowed stops the run here
        lr = self.lr_at(global_step)
        compiling = len(y) not in self._batch_sizes
        self._batch_sizes.add(len(y))
        self._emit("before_step", compiling)
        t0 = time.perf_counter()
        loss, logits = self.group.train_step(self.adapter, self.model, X, y, lr)
        seconds = time.perf_counter() - t0
        if self.check_finite and not math.isfinite(loss):
            raise NonFinite(loss, epoch, step, lr)
        correct = int((logits.argmax(axis=1) == y).sum())
        return StepEnd(epoch, step, lr, loss, len(y), correct, seconds, compiling)

    def run_steps(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], first_step: int = 0) -> list[float]:
        """Step through ``batches`` as one stretch (parity's lockstep): the loss of every step."""
        return [self.step(0, i, first_step + i, X, y).loss for i, (X, y) in enumerate(batches)]

    def train_epoch(
        self, epoch: int, batches: Iterable[tuple[np.ndarray, np.ndarray]], first_step: int
    ) -> tuple[_Tally, int]:
        """Every step of one epoch: the epoch's tally (over all workers) and its last step index."""
        self._emit("on_epoch_begin", epoch)
        tally, step = _Tally(), -1
        for step, (X, y) in enumerate(batches):
            end = self.step(epoch, step, first_step + step, X, y)
            tally.add(end)
            self._emit("on_step_end", end, tally.loss_sum / tally.seen, tally.correct / tally.seen)
        world = self.group.world
        if world > 1:  # this worker's accuracy so far -> the whole run's
            tally.correct = int(self.group.sum(np.array([tally.correct], np.float64))[0])
            tally.seen, tally.steady_images, tally.loss_sum = (
                tally.seen * world,
                tally.steady_images * world,
                tally.loss_sum * world,
            )
        return tally, step

    def fit(
        self,
        epochs: range,
        batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
        steps_per_epoch: int,
        test: Callable[[Callable[[int, int], None]], tuple[float, float]],
    ) -> list[dict[str, Any]]:
        """Train ``epochs`` (``batches(epoch)`` each), evaluating with ``test(progress)`` after
        each; returns the new epochs' metrics. Callbacks see every epoch's end (and checkpoint)."""
        metrics = []
        for epoch in epochs:
            started = time.perf_counter()
            tally, step = self.train_epoch(epoch, batches(epoch), epoch * steps_per_epoch)
            lr = self.lr_at(epoch * steps_per_epoch + max(step, 0))
            t0 = time.perf_counter()
            test_loss, test_acc = test(lambda done, total: self._emit("on_evaluate", done, total))
            self._emit("on_evaluated", time.perf_counter() - t0)
            if self.check_finite and not math.isfinite(test_loss):
                raise NonFinite(test_loss, epoch, step, lr, shown_by="test loss")
            weights = self._weights(epoch, step, lr)
            metrics.append(_epoch_metrics(epoch, tally, test_loss, test_acc, time.perf_counter() - started))
            end = EpochEnd(
                epoch,
                metrics[-1],
                weights,
                (epoch + 1) * steps_per_epoch,
                lambda: self.group.get_optimizer_state(self.adapter, self.model),
            )
            self._emit("on_epoch_end", end)
        return metrics

    def _weights(self, epoch: int, step: int, lr: float) -> dict[str, np.ndarray]:
        try:
            return self.group.get_weights(self.adapter, self.model)
        except WeightFileError:  # non-finite weights: the last updates diverged
            raise NonFinite("non-finite", epoch, step, lr, shown_by="weights") from None

    def close(self) -> None:
        self._emit("on_close")


def _epoch_metrics(epoch: int, tally: _Tally, test_loss: float, test_acc: float, seconds: float) -> dict[str, Any]:
    return {
        "epoch": epoch + 1,
        "train_loss": tally.loss_sum / tally.seen,
        "train_acc": tally.correct / tally.seen,
        "test_loss": test_loss,
        "test_acc": test_acc,
        # Steps that compiled (a new batch shape) are left out of the speed (None when every step
        # did): their time is compile_s.
        "images_per_s": tally.steady_images / tally.steady_s if tally.steady_s > 0 else None,
        "compile_s": tally.compile_s,
        "seconds": seconds,
    }
