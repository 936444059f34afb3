"""A training run: data, network, starting weights or checkpoint, the engine, the files.

The step itself is each framework's own (``Adapter.train_step``, or a distributed engine's
through a :class:`~common.distributed.group.Group`); the loop is :class:`~common.training.engine.Engine`;
the files are :class:`~common.training.rundir.RunDir`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import data
from common.adapter import Adapter, Model
from common.arch import plan
from common.distributed.group import Group
from common.distributed.sharding import check_divisible
from common.process import allocator, lifeline, threads
from common.registry import load_backend
from common.training.callbacks import Checkpointer, ProgressCallback, StepRecorder
from common.training.engine import EVAL_BATCH, Callback, Engine, LocalGroup, NonFinite, evaluate
from common.training.plot import PlotUnavailable, plot_runs
from common.training.progress import Progress
from common.training.rundir import RunDir
from common.training.settings import MEMORY_EFFICIENT_ALONE, Diverged, TrainingError, TrainingInterrupted, TrainSettings
from common.weights.starting import StartingWeights, starting_weights

__all__ = ["train"]


@dataclass
class _Data:
    dataset: data.Dataset
    train: data.Split
    test: data.Split
    start: StartingWeights | None


@dataclass
class _Resumed:
    """Where a resumed run goes on from (a new run starts at epoch 0 with nothing recorded)."""

    epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


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
    callbacks: Sequence[Callback] = (),
) -> list[dict[str, Any]]:
    """Train (or continue) a run; returns the metrics of every epoch.

    ``out`` must not hold a run unless ``resume`` (continue it) or ``overwrite`` (replace it); the
    directory is locked for the whole run (a second writer is refused). ``progress`` prints a live
    line on a terminal (``live``: force either way) and one line per epoch elsewhere. A NaN or
    infinite loss stops the run (:class:`Diverged`); Ctrl-C, SIGTERM and SIGHUP stop it
    (:class:`TrainingInterrupted`); both say what was kept. ``callbacks`` see the loop too.

    ``group``: this process is one worker of a data-parallel run (``common.distributed``); the
    workers step together on their shards of every global batch, and worker 0 alone writes.
    """
    # Everything the user gave is checked before a framework loads (seconds) or a file changes.
    writer = group is None or group.writer
    rundir = RunDir(out, writer=writer).check(resume=resume, overwrite=overwrite)
    with rundir.locked() if writer else nullcontext():
        found = _prepare(settings, data_dir, resume)
        adapter = load_backend(settings.backend)
        group = group or LocalGroup(adapter, memory_efficient=settings.memory_efficient, precision=settings.precision)
        if settings.memory_efficient and not isinstance(group, LocalGroup):
            raise TrainingError(MEMORY_EFFICIENT_ALONE)
        if settings.precision != "float32" and not isinstance(group, LocalGroup):
            raise TrainingError(settings.one_process_precision())
        check_divisible(settings.batch_size, group.replicas)
        model = group.build(adapter, settings.config, seed=settings.seed, sync_bn=settings.sync_bn)
        if settings.transition_pool == "max":
            adapter.use_max_pool_in_transitions(model)
        if found.start is not None:
            group.set_weights(adapter, model, found.start.weights)
        return _run(settings, rundir, found, adapter, group, model, resume, overwrite, progress, live, callbacks)


def _prepare(settings: TrainSettings, data_dir: str | os.PathLike | None, resume: bool) -> _Data:
    """The data set, the two splits and the starting weights, checked against the network."""
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
    start = (
        starting_weights(settings.init, settings.init_format, config, settings.seed)
        if settings.init is not None and not resume
        else None
    )
    for note in (dataset.channel_note(config.in_channels), start.notice if start else None):
        if note:
            print(f"note: {note}", file=sys.stderr)
    return _Data(
        dataset, data.subset(dataset.train, settings.limit), data.subset(dataset.test, settings.test_limit), start
    )


def _steps_per_epoch(settings: TrainSettings, count: int, replicas: int) -> int:
    """Global batches with at least one image per worker (data.batches' shard)."""
    b = settings.batch_size
    return sum(1 for first in range(0, count, b) if min(b, count - first) >= replicas)


def _run_info(settings: TrainSettings, adapter: Adapter, found: _Data, rundir: RunDir, resume: bool) -> dict[str, Any]:
    info = {
        "settings": settings.to_dict(),
        "framework": adapter.framework,
        "version": adapter.version(),
        "malloc": allocator.in_use(),
        "threads": threads.current(),  # every framework's pools (common.process.threads)
        **allocator.engine_record(settings.backend),
        "data": {**found.dataset.info, "evaluated_on": found.dataset.test_name, "augment": _augment_info(settings)},
        "init": found.start.record if found.start is not None else None,
    }
    if resume:  # the starting weights are the first run's: keep its record of them
        info["init"] = rundir.recorded_init()
    return info


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


def _run(
    settings: TrainSettings,
    rundir: RunDir,
    found: _Data,
    adapter: Adapter,
    group: Group,
    model: Model,
    resume: bool,
    overwrite: bool,
    progress: bool,
    live: bool | None,
    callbacks: Sequence[Callback],
) -> list[dict[str, Any]]:
    steps = _steps_per_epoch(settings, len(found.train.labels), group.replicas)
    adapter.configure_optimizer(model, settings.sgd)
    done = _resume(settings, rundir, found, adapter, group, model, steps) if resume else _Resumed()
    run_info = _run_info(settings, adapter, found, rundir, resume)
    recorder = StepRecorder(done.steps)
    bar = Progress(
        adapter.name, settings.epochs, steps, start_epoch=done.epoch, quiet=not (progress and group.writer), live=live
    )
    engine = Engine(
        group,
        adapter,
        model,
        lambda step: settings.lr_at(step, settings.epochs * steps),
        [
            recorder,
            Checkpointer(rundir, run_info, overwrite, settings.config, done.metrics, recorder),
            ProgressCallback(bar, found.dataset.test_name),
            *callbacks,
        ],
    )
    metrics = done.metrics + _fit(settings, rundir, found, engine, done.epoch, steps)
    final = group.get_weights(adapter, model)
    if group.writer:
        _finish(settings, rundir, final, len(metrics))
    return metrics


def _fit(
    settings: TrainSettings, rundir: RunDir, found: _Data, engine: Engine, start_epoch: int, steps: int
) -> list[dict[str, Any]]:
    """The engine's epochs, a stop turned into the message that says what was kept."""
    group, config = engine.group, settings.config
    shard = (group.rank, group.world) if group.world > 1 else None

    def batches(epoch: int):
        return data.batches(
            found.train,
            settings.batch_size,
            settings.resize,
            seed=settings.seed,
            epoch=epoch,
            augment=settings.augment,
            augment_padding=settings.augment_padding,
            channels=config.in_channels,
            shard=shard,
        )

    def test(progress):
        adapter, model = engine.adapter, engine.model
        return evaluate(adapter, model, found.test, EVAL_BATCH, settings.resize, progress, config.in_channels, group)

    try:
        return engine.fit(range(start_epoch, settings.epochs), batches, steps, test)
    except BaseException as exc:
        rundir.abandon()
        if isinstance(exc, NonFinite):
            raise Diverged(_diverged(exc, rundir)) from None
        if isinstance(exc, KeyboardInterrupt):
            epoch = rundir.checkpoint_epoch or start_epoch
            signum = getattr(exc, "signum", signal.SIGINT)  # lifeline's SIGTERM and SIGHUP too
            by = "" if signum == signal.SIGINT else f" by {lifeline.describe(signum)}"
            raise TrainingInterrupted(
                f"interrupted{by} in epoch {epoch + 1}; {rundir.kept()} ({rundir.how_to_go_on()})"
            ) from None
        raise
    finally:
        engine.close()  # the live line, however the loop ended


def _resume(
    settings: TrainSettings, rundir: RunDir, found: _Data, adapter: Adapter, group: Group, model: Model, steps: int
) -> _Resumed:
    """Load the checkpoint into ``model`` after checking it continues this very run."""
    checkpoint = rundir.load_checkpoint(settings.config)
    saved = _recorded(checkpoint.metadata, "settings", rundir)
    try:
        saved = json.loads(saved)
    except ValueError:
        raise TrainingError(f"--resume: {rundir.checkpoint} records unreadable settings") from None
    differs = [
        k for k, v in settings.to_dict().items() if k not in TrainSettings.RESUMABLE_DIFFERENCES and saved.get(k) != v
    ]
    if differs:
        raise TrainingError(
            f"--resume: {rundir.checkpoint} was written with other settings ({', '.join(differs)}); "
            "resume with the same options or start a new --out"
        )
    if _recorded(checkpoint.metadata, "data", rundir) != found.dataset.info["sha256"]:
        raise TrainingError(
            f"--resume: the run trained on other {found.dataset.name} data than {found.dataset.info['dir']} holds now "
            "(another directory, or changed files); resume with the same data or start a new --out"
        )
    epoch = int(_recorded(checkpoint.metadata, "epoch", rundir))
    _check_epochs(settings, int(saved.get("epochs", epoch)), epoch, steps, rundir)
    step = int(_recorded(checkpoint.metadata, "step", rundir))
    if step != epoch * steps:
        raise TrainingError(
            f"--resume: {rundir.checkpoint} stopped at step {step}, but epoch {epoch} of this data ends at "
            f"step {epoch * steps}; resume with the same data and options or start a new --out"
        )
    try:
        done = _Resumed(epoch, rundir.read_metrics(epoch), rundir.read_steps(epoch))
    except TrainingError as exc:
        raise TrainingError(
            f"--resume: {exc}; the checkpoint holds epoch {epoch} and its records are needed to go on "
            "(restore the file, or start again with --overwrite)"
        ) from None
    if settings.sgd.has_state and not checkpoint.optimizer_state:
        raise TrainingError(
            f"--resume: {rundir.checkpoint} holds no momentum velocities to continue {settings.sgd.describe()}"
        )
    group.set_weights(adapter, model, checkpoint.weights)
    group.set_optimizer_state(adapter, model, checkpoint.optimizer_state)  # every worker loads the same
    rundir.checkpoint_epoch = epoch
    return done


def _recorded(metadata: dict[str, str], key: str, rundir: RunDir) -> str:
    if key not in metadata:
        raise TrainingError(f"--resume: {rundir.checkpoint} is not a training checkpoint (it records no {key!r})")
    return metadata[key]


def _check_epochs(settings: TrainSettings, planned: int, done: int, steps: int, rundir: RunDir) -> None:
    """A different ``--epochs`` continues the run only where no rate changes: a finished run is
    said to be finished, fewer epochs than the checkpoint holds are refused, and a schedule laid
    over the epochs (cosine) is not stretched."""
    wanted = settings.epochs
    if done >= wanted:
        if done == planned == wanted:
            raise TrainingError(
                f"--resume: the run in {rundir.path} is finished (all {done} epochs; {rundir.weights.name} holds its "
                "weights); to train on, give a larger --epochs (a constant rate can be extended)"
            )
        raise TrainingError(
            f"--resume --epochs {wanted}: {rundir.checkpoint} already holds epoch {done}; give --epochs above {done}"
        )
    if wanted == planned:
        return
    was = dataclasses.replace(settings, epochs=planned)
    for step in range(min(planned, wanted) * steps):
        old, new = was.lr_at(step, planned * steps), settings.lr_at(step, wanted * steps)
        if old != new:
            raise TrainingError(
                f"--resume --epochs {wanted}: the run's {settings.lr_schedule} schedule was laid over {planned} "
                f"epochs; over {wanted} the rate of step {step + 1} would be {new:g} instead of {old:g}. Resume with "
                f"--epochs {planned}, or start a new run with --epochs {wanted}"
            )


def _finish(settings: TrainSettings, rundir: RunDir, final: dict[str, np.ndarray], epochs: int) -> None:
    rundir.save(
        rundir.weights.name,
        final,
        settings.config,
        source=settings.backend,
        extra_metadata={"epoch": str(epochs), "settings": json.dumps(settings.to_dict())},
    )
    try:
        plot_runs([rundir.path], rundir.curves)
    except PlotUnavailable as exc:
        print(f"note: {rundir.curves} not drawn: {exc}", file=sys.stderr)


def _diverged(exc: NonFinite, rundir: RunDir) -> str:
    """The one message of a diverged run: ``the loss became nan at epoch E, step S`` and what was kept."""
    cause = f": the epoch's last update made the {exc.shown_by} {exc.value}" if exc.shown_by else ""
    return (
        f"the loss became {exc.value} at epoch {exc.epoch + 1}, step {exc.step + 1} "
        f"(learning rate {exc.lr:g}){cause}; stopped instead of training on garbage; {rundir.kept()}; "
        "try a lower --lr (in a new --out, or with --overwrite)"
    )
