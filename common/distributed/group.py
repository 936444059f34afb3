"""The interface every backend's ``distributed.py`` implements, and how a worker joins its group.

A worker process is started by an engine's launcher (``torchrun``, ``tools/launch.py``, a
``TF_CONFIG`` per machine, the JAX coordinator variables) or by :func:`common.distributed.launch`,
which sets the same environment on one machine. ``connect(backend)`` reads that environment in
the backend's own module and returns a :class:`Group`: this worker's rank, the number of workers,
and the engine's data-parallel training step.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from common.adapter import Adapter, Model
from common.config import DenseNetConfig
from common.errors import DenseNetError, Failed
from common.process import lifeline
from common.registry import BACKENDS, launch_spec, load_backend

# Every rendezvous and collective waits at most this long (seconds) for the other workers; a
# worker that died or never started turns into an error instead of a hang.
TIMEOUT_ENV = "DENSENET_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
# Set by common.distributed.launch in every process it starts (the CLI refuses --workers there).
WORKER_ENV = "DENSENET_DIST_WORKER"


class DistributedError(Failed):
    """A distributed run that cannot start or go on (an engine refusing, a worker missing)."""


class SyncBatchNormUnavailable(DenseNetError, ValueError):
    """``--sync-bn`` where the engine has no BatchNorm that synchronises across processes."""


class PeerLost(DistributedError):
    """Another worker of the group is gone (it died, or was stopped): the engine's collective
    failed for want of it. One line and exit status 1, like any failure the command expects,
    instead of the framework's exception, which the CLI would report as an internal error."""


def timeout_s() -> float:
    """The rendezvous/collective timeout in seconds (``$DENSENET_DIST_TIMEOUT``, default 120)."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"${TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise DistributedError(f"${TIMEOUT_ENV} must be above 0, got {value!r}")
    return seconds


# A bound on a whole local job (seconds), for tests and batch systems; unset: none.
JOB_TIMEOUT_ENV = "DENSENET_DIST_JOB_TIMEOUT"


def job_timeout_s() -> float | None:
    """``$DENSENET_DIST_JOB_TIMEOUT`` in seconds, or None (a training run may take days)."""
    value = os.environ.get(JOB_TIMEOUT_ENV)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise DistributedError(f"${JOB_TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


def in_worker() -> bool:
    """Whether this process was started by :func:`common.distributed.launch`."""
    return os.environ.get(WORKER_ENV) == "1"


Method = TypeVar("Method", bound=Callable[..., Any])
# The location prefix of gloo's and XLA's messages ("[../gloo/transport/tcp/pair.cc:553] ").
_SOURCE = re.compile(r"^\[[^\]]*:\d+\]\s*")


def telling_line(message: str, pattern: str) -> str:
    """The first line of an engine's ``message`` that matches ``pattern`` (else its first line),
    its first sentence (the engines go on with advice meant for their own users), without a
    source-location prefix, at most 200 characters."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [""]
    line = next((x for x in lines if re.search(pattern, x, re.IGNORECASE)), lines[0])
    line = re.split(r"(?<=\.)\s+(?=[A-Z])", _SOURCE.sub("", line))[0].rstrip(".")
    return line[:200] + ("..." if len(line) > 200 else "")


def collective(method: Method) -> Method:
    """Marks a :class:`Group` method that waits on the other workers: the engine's error for a
    worker that went away (:meth:`Group.peer_gone`) becomes :class:`PeerLost`.

    When this worker was asked to stop itself (Ctrl-C, passed on by the launcher to every worker),
    whatever the engine raised is the interrupt's doing: the others left for the same reason, or
    the framework turned the KeyboardInterrupt raised inside its own code into another exception
    (TensorFlow's pybind11: ``MISMATCH of original and normalized active exception types``). The
    interrupt is raised instead, so that training says what it kept, as for Ctrl-C."""

    @functools.wraps(method)
    def checked(self: Group, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            signum = lifeline.interrupted()
            if signum is not None:
                raise lifeline.Interrupt(signum) from None
            detail = self.peer_gone(exc)
            if detail is None:
                raise
            raise PeerLost(
                f"worker {self.rank}: another worker of the group is gone ({detail}); this one stops too"
            ) from None

    return checked  # type: ignore[return-value]


class Group(ABC):
    """This worker's view of its data-parallel group, on one framework's distributed engine.

    ``rank`` and ``world`` count processes (worker 0 writes every file); ``replicas`` counts the
    data shards a step is cut into, which is ``world`` except where one process drives several
    devices (JAX's host devices). Arrays in and out are numpy, images NCHW, as in the adapters.
    """

    backend: str
    rank: int
    world: int
    replicas: int

    @property
    def writer(self) -> bool:
        """Whether this worker writes the run's files (worker 0 only)."""
        return self.rank == 0

    @abstractmethod
    def build(
        self, adapter: Adapter, config: DenseNetConfig, seed: int = 0, dtype: str = "float32", sync_bn: bool = False
    ) -> Model:
        """The network, built as the engine needs it (in the strategy's scope, wrapped for
        gradient averaging, with synchronised BatchNorm when ``sync_bn``); the same seeded
        weights on every worker. ``sync_bn`` where the engine has none across processes is a
        :class:`SyncBatchNormUnavailable`."""

    @abstractmethod
    def train_step(
        self, adapter: Adapter, model: Model, X: np.ndarray, y: np.ndarray, lr: float
    ) -> tuple[float, np.ndarray]:
        """One data-parallel step of ``model.sgd`` (``common.training.optim.SGD``, set by
        ``adapter.configure_optimizer``) at rate ``lr`` on this worker's shard ``X`` (NCHW), ``y``:
        ``(mean loss over the whole global batch, this shard's logits)``. Gradients are averaged
        over the workers by the engine before the optimiser sees them, so the velocities stay
        identical on every worker; each running statistic becomes the mean over the workers of
        their updates (identical on all of them with ``sync_bn``), in the canonical convention."""

    def get_optimizer_state(self, adapter: Adapter, model: Model) -> dict[str, np.ndarray]:
        """The velocities as ``adapter.get_optimizer_state`` gives them (identical on every
        worker; no communication, so worker 0 alone may ask)."""
        return adapter.get_optimizer_state(model)

    def set_optimizer_state(self, adapter: Adapter, model: Model, state: dict[str, np.ndarray]) -> None:
        """Load velocities from ``get_optimizer_state`` (of any backend or run); every worker
        loads the same ones."""
        adapter.set_optimizer_state(model, state)

    @abstractmethod
    def set_weights(self, adapter: Adapter, model: Model, weights: dict[str, np.ndarray]) -> None:
        """Load canonical weights into a model :meth:`build` made (identical on every worker)."""

    @abstractmethod
    def get_weights(self, adapter: Adapter, model: Model) -> dict[str, np.ndarray]:
        """The canonical weights (identical on every worker)."""

    @abstractmethod
    def forward(self, adapter: Adapter, model: Model, X: np.ndarray) -> np.ndarray:
        """Inference-mode logits of this worker's own images (no communication)."""

    @abstractmethod
    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of a small float64 vector over the workers, with the engine's own
        collective (evaluation counts, accuracy)."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group (best effort; the process is about to end)."""

    def peer_gone(self, exc: Exception) -> str | None:
        """When ``exc``, raised by the engine in a :func:`collective` method, means that another
        worker went away (a connection it closed, a collective it never joined): the telling line
        of its message; else None (an error of this worker's own, reported as it is)."""
        return None


def connect(backend: str) -> Group:
    """Join the group the environment describes, with ``backend``'s engine (its
    ``distributed.connect``); imports the framework."""
    adapter = load_backend(backend)
    module: Any = importlib.import_module(f"{BACKENDS[adapter.name].package}.distributed")
    return module.connect(timeout_s=timeout_s())


def check_sync_bn(backend: str) -> None:
    """Refuse ``--sync-bn`` for an engine without a BatchNorm synchronised across processes,
    before anything starts (no framework imported: the backend's ``launch.py``)."""
    engine = launch_spec(backend).engine
    reason = engine.sync_bn_refusal if engine is not None else None
    if reason:
        raise SyncBatchNormUnavailable(f"--sync-bn with --backend {backend}: {reason}")
