"""What a training run is asked to do (:class:`TrainSettings`) and how it can fail.

The settings are recorded in ``run.json`` and in every checkpoint; ``--resume`` compares them.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from common import data
from common.adapter import PRECISIONS
from common.config import DenseNetConfig
from common.errors import DenseNetError, Failed, Interrupted
from common.training.optim import SGD, LRSchedule, OptimizerError
from common.weights.starting import FORMATS as INIT_FORMATS

__all__ = [
    "MEMORY_EFFICIENT_ALONE",
    "TRANSITION_POOLS",
    "Diverged",
    "TrainSettings",
    "TrainingError",
    "TrainingInterrupted",
]


class TrainingError(DenseNetError, RuntimeError):
    """Training cannot start or go on (a run directory in the way, a checkpoint that does not fit)."""


class Diverged(TrainingError, Failed):
    """The loss (or the weights) became NaN or infinite."""


class TrainingInterrupted(TrainingError, Interrupted):
    """Ctrl-C during training; the message says what was kept."""


TRANSITION_POOLS = ("avg", "max")

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
    # The optimiser and the schedule (common.training.optim, docs/training.md "The optimiser"): SGD in
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
    # and a weight file to start from (its layout: canonical or a peer's; common.weights.starting).
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
    # The pool of every transition block: the book's 2x2 average, or max (the book's exercise 1,
    # `densenet exercise pooling`; PyTorch and TensorFlow, one process).
    transition_pool: str = "avg"
    # "bfloat16": mixed precision, each framework's own (docs/precision.md); the weights, the
    # checkpoints and the optimiser state stay float32.
    precision: str = "float32"

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
        if self.transition_pool not in TRANSITION_POOLS:
            raise TrainingError(f"transition pool must be avg or max, got {self.transition_pool!r}")
        if self.transition_pool != "avg" and self.workers > 1:
            raise TrainingError("a max-pool transition trains in one process only; drop --workers")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "float32" and self.workers > 1:
            raise TrainingError(self.one_process_precision())

    def one_process_precision(self) -> str:
        """Why mixed precision is refused beside data-parallel workers: the distributed engines
        build their own replicas, in float32."""
        return f"{self.precision} trains in one process only; drop --workers and --distributed"

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

    # Settings a resumed run must share with the run it continues (epochs may grow; the workers
    # may change, since the global batches are the same for any number of them, and so may the
    # memory-efficient mode, which computes the same training).
    RESUMABLE_DIFFERENCES = ("epochs", "workers", "memory_efficient")
