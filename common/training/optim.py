"""The optimiser every backend trains with, defined once: SGD with momentum, Nesterov momentum and
weight decay in PyTorch's meaning, and the learning-rate schedules (docs/training.md, "The optimiser").

The frameworks use the same words for different updates (docs/departures.md): MXNet's SGD and
Keras fold the learning rate into the velocity, Keras 3's ``weight_decay`` is decoupled from the
gradient. Each adapter configures or wraps its framework's own optimiser (``torch.optim.SGD``, an
``mx.optimizer`` subclass, an optax chain, a ``keras.optimizers.SGD`` subclass) to compute
:func:`sgd_update` below, which is also what the numpy oracle runs. Nothing here imports a framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.arch import canonical_spec, is_state
from common.config import DenseNetConfig
from common.errors import DenseNetError
from common.weights.canonical import MOMENTUM_BUFFER, format_problems, weight_problems

__all__ = [
    "FOLDED_LR",
    "DECOUPLED_WEIGHT_DECAY",
    "MOMENTUM_BUFFER",
    "SCHEDULES",
    "SGD",
    "SUITE",
    "Convention",
    "LRSchedule",
    "OptimizerError",
    "check_state",
    "sgd_update",
    "state_spec",
]

SCHEDULES = ("constant", "cosine", "step")


class OptimizerError(DenseNetError, ValueError):
    """Optimiser or schedule settings that mean nothing (a momentum of 1, Nesterov without momentum)."""


def _number(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptimizerError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SGD:
    """SGD in PyTorch's meaning (``torch.optim.SGD`` with dampening 0), for learning rate ``lr``,
    gradient ``g``, weight ``w`` and velocity ``b`` (zero before the first step)::

        g = g + weight_decay * w            # coupled: the decay goes through the velocity
        b = momentum * b + g                # the velocity holds gradients, not lr * gradients
        d = g + momentum * b  if nesterov else  b
        w = w - lr * d

    ``SGD()`` is plain SGD (the book's). Weight decay applies to every parameter, BatchNorm scales
    and biases included (PyTorch's default); the running statistics are not parameters.
    """

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        momentum = _number(self.momentum, "momentum")
        weight_decay = _number(self.weight_decay, "weight decay")
        if not 0 <= momentum < 1:
            raise OptimizerError(f"momentum must be in [0, 1), got {momentum:g}")
        if not isinstance(self.nesterov, bool):
            raise OptimizerError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and momentum == 0:
            raise OptimizerError("Nesterov momentum needs a momentum above 0 (give --momentum, e.g. 0.9)")
        if weight_decay < 0:
            raise OptimizerError(f"weight decay must be 0 or more, got {weight_decay:g}")
        object.__setattr__(self, "momentum", momentum)
        object.__setattr__(self, "weight_decay", weight_decay)

    @property
    def has_state(self) -> bool:
        """Whether the optimiser keeps a velocity per parameter (only with momentum)."""
        return self.momentum > 0

    def describe(self) -> str:
        if not (self.momentum or self.weight_decay):
            return "plain SGD"
        parts = [f"{'Nesterov ' if self.nesterov else ''}momentum {self.momentum:g}"] if self.momentum else []
        parts += [f"weight decay {self.weight_decay:g}"] if self.weight_decay else []
        return "SGD, " + ", ".join(parts)


def state_spec(config: DenseNetConfig, sgd: SGD) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes of the optimiser state: ``<param>.momentum_buffer`` for every
    parameter (canonical layout, forward order) with momentum, nothing without."""
    if not sgd.has_state:
        return {}
    return {k + MOMENTUM_BUFFER: shape for k, shape in canonical_spec(config).items() if not is_state(k)}


def check_state(
    config: DenseNetConfig, sgd: SGD, state: dict[str, np.ndarray], source: str = "optimizer state"
) -> None:
    """Refuse, naming every problem, a state that is not exactly ``state_spec``'s (finite floats)."""
    problems = weight_problems(state_spec(config, sgd), state)
    if problems:
        raise OptimizerError(format_problems(f"{source} does not fit {sgd.describe()} on this network", problems))


@dataclass(frozen=True)
class Convention:
    """How a framework's stock optimiser reads the words of :class:`SGD` (for ``parity --naive``).

    ``Convention()`` is the suite's (PyTorch's, optax's). ``lr_in_velocity``: the velocity holds
    ``-lr * g`` and the step adds it, ``v = momentum * v - lr * g; w = w + v`` (Nesterov:
    ``w = w + momentum * v - lr * g``), as in MXNet's ``sgd`` and Keras's ``SGD``; the same update
    while the rate is constant, a different one as soon as it changes. ``decoupled_weight_decay``:
    ``w = w - lr * weight_decay * w`` before the step and outside the velocity (Keras 3's
    ``weight_decay``); the same for plain SGD, different with momentum.
    """

    lr_in_velocity: bool = False
    decoupled_weight_decay: bool = False


SUITE = Convention()  # PyTorch, optax
FOLDED_LR = Convention(lr_in_velocity=True)  # MXNet sgd and nag, Keras SGD
DECOUPLED_WEIGHT_DECAY = Convention(lr_in_velocity=True, decoupled_weight_decay=True)  # Keras SGD(weight_decay=)


def sgd_update(
    w: np.ndarray,
    g: np.ndarray,
    velocity: np.ndarray | None,
    lr: float,
    sgd: SGD,
    convention: Convention = SUITE,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One step of ``sgd`` on one tensor: ``(new weight, new velocity)`` (velocity ``None``: zero,
    and ``None`` back without momentum). The suite's definition unless ``convention`` says otherwise;
    with ``lr_in_velocity`` the velocity is the framework's own (``-lr`` times the suite's)."""
    mu, wd = sgd.momentum, sgd.weight_decay
    if convention.decoupled_weight_decay:
        w = w - lr * wd * w if wd else w
    elif wd:
        g = g + wd * w
    if not sgd.has_state:
        return w - lr * g, None
    v = np.zeros_like(g) if velocity is None else velocity
    if convention.lr_in_velocity:
        v = mu * v - lr * g
        return (w + (mu * v - lr * g) if sgd.nesterov else w + v), v
    v = mu * v + g
    return w - lr * (g + mu * v if sgd.nesterov else v), v


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every step, for a run of ``epochs`` epochs of ``steps_per_epoch`` steps.

    With base rate ``lr``, step ``t`` (from 0), ``T = epochs * steps_per_epoch`` and
    ``W = round(warmup_epochs * steps_per_epoch)`` warm-up steps::

        constant  lr
        cosine    lr * (1 + cos(pi * (t - W) / (T - W))) / 2      (lr during the warm-up)
        step      lr * gamma ** (number of milestones <= the epoch of t, t // steps_per_epoch)

    and the warm-up multiplies the first ``W`` steps by ``(t + 1) / W``, a linear ramp to ``lr``.
    """

    kind: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise OptimizerError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        milestones = tuple(self.milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones):
            raise OptimizerError(f"milestones must be epochs from 1 on, got {list(milestones)}")
        if list(milestones) != sorted(set(milestones)):
            raise OptimizerError(f"milestones must increase, got {list(milestones)}")
        if milestones and self.kind != "step":
            raise OptimizerError(f"milestones belong to the step schedule, not {self.kind!r}")
        if self.kind == "step" and not milestones:
            raise OptimizerError("the step schedule needs milestones (epochs at which the rate drops), e.g. 30,60")
        gamma = _number(self.gamma, "gamma")
        if not 0 < gamma <= 1:
            raise OptimizerError(f"gamma must be in (0, 1], got {gamma:g}")
        warmup = _number(self.warmup_epochs, "warm-up epochs")
        if warmup < 0:
            raise OptimizerError(f"warm-up epochs must be 0 or more, got {warmup:g}")
        object.__setattr__(self, "milestones", milestones)
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "warmup_epochs", warmup)

    def check(self, epochs: int) -> None:
        """Refuse a warm-up or milestone the run of ``epochs`` epochs never reaches."""
        if self.warmup_epochs >= epochs:
            raise OptimizerError(f"the warm-up ({self.warmup_epochs:g} epochs) must end before the run ({epochs})")
        if self.milestones and self.milestones[-1] >= epochs:
            raise OptimizerError(f"milestone {self.milestones[-1]} is not before the last epoch ({epochs})")

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.warmup_epochs * steps_per_epoch)

    def lr_at(self, lr: float, step: int, steps_per_epoch: int, epochs: int) -> float:
        """The rate of step ``step`` (0-based; see the class docstring)."""
        total, warmup = epochs * steps_per_epoch, self.warmup_steps(steps_per_epoch)
        if self.kind == "cosine":
            t = max(step - warmup, 0)
            value = lr * 0.5 * (1 + math.cos(math.pi * t / max(total - warmup, 1)))
        elif self.kind == "step":
            value = lr * self.gamma ** sum(1 for m in self.milestones if m <= step // steps_per_epoch)
        else:
            value = lr
        return value * (step + 1) / warmup if step < warmup else value
