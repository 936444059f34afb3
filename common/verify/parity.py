"""Numerical parity: identical canonical weights and inputs, the same numbers from every backend.

Every backend is compared with ``numpy``, the plain implementation in ``common.oracle.reference`` and
``common.oracle.reference_grad`` computed in float64, which stands in for exact arithmetic; backends are
also compared pairwise. Checks, each starting again from the same initial weights:

1. ``inference``: logits and every stage's activations with running statistics;
2. ``train-forward``: the same in training mode (batch statistics);
3. ``grad-input`` / ``grad-params``: gradient of the mean cross-entropy w.r.t. input and weights;
4. ``running-stats``: BatchNorm running statistics after one training step, in the canonical
   (unbiased) convention every adapter keeps;
5. ``sgd-step``: every tensor after one plain SGD step; ``lockstep``: the loss over ``steps`` SGD
   steps on the same batches in the same order;
6. ``momentum-step`` / ``nesterov-step``: every tensor and every velocity after one step of SGD
   with momentum (Nesterov) and weight decay (``PARITY_MOMENTUM``, ``PARITY_NESTEROV``) from the
   same seeded velocities; ``momentum-lockstep``: the loss over ``steps`` Nesterov steps at a rate
   that changes every step (``PARITY_SCHEDULE``: warm-up, then cosine), where the frameworks' own
   conventions for the learning rate in the velocity would part (``common.training.optim``).

The error model (docs/parity.md): a check's error is the largest ``|a - b|`` of a tensor divided by
that tensor's *scale*, and it must stay below ``C * u``, with ``u`` the unit roundoff of the dtype
(2**-24 for float32, 2**-53 for float64) and ``C`` a per-check constant (``ERROR_MODEL``). The
scale is the largest magnitude of the float64 reference for activations, weights and losses, and
for gradients and running means the largest sum of absolute values of the terms their last
reduction adds up, so a gradient that cancels to nearly zero is not judged against its own small
size. A float64 run must also meet the suite's claim, ``FLOAT64_CLAIM``, for every figure.

In mixed precision (``precision="bfloat16"``: bfloat16 compute, float32 weights) the same checks
run with ``u = 2**-8``, bfloat16's unit roundoff, and their own constants (``ERROR_MODEL_BF16``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.adapter import Adapter, check_dtype, check_precision
from common.arch import plan
from common.config import DenseNetConfig
from common.errors import BackendUnavailable
from common.oracle import reference, reference_grad
from common.process.threads import environment as thread_environment
from common.registry import BACKENDS, canonical_name, load_backend
from common.training.engine import Engine, LocalGroup
from common.training.optim import DECOUPLED_WEIGHT_DECAY, FOLDED_LR, SGD, Convention, LRSchedule, sgd_update
from common.verify.harness import seeded_batches
from common.weights.canonical import init_canonical

ORACLE = "numpy"

# By the arithmetic a run computes in: its dtype, or bfloat16 in mixed precision.
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}

# C of the error model per check: the float32 bound is C * 2**-24. Each C is the power of two at
# least 5x above the worst error `densenet parity-sweep` measured on the parity case (seeds 0-15,
# 1 and 2 threads, oneDNN on and off, every backend and pair; docs/parity.md), in units u = 2**-24
# of the tensor's scale (module docstring).
ERROR_MODEL: dict[str, float] = {
    "inference": 128,  # worst measured 13.7 u
    "train-forward": 256,  # 37 u
    "grad-input": 128,  # 17 u
    "grad-params": 512,  # 86 u (stem.conv.bias: zero in exact arithmetic, pure rounding)
    "running-stats": 256,  # 32 u
    "sgd-step": 256,  # 32 u (the running statistics after the step)
    "lockstep": 4096,  # 586 u after 20 steps
    "momentum-step": 512,  # 86 u (stem.conv.bias.momentum_buffer: the gradient's rounding, as grad-params)
    "nesterov-step": 512,  # 86 u (the same velocity)
    "momentum-lockstep": 4096,  # 542 u after 20 Nesterov steps at a changing rate
}

# C of the bfloat16 error model (mixed precision: bfloat16 compute, float32 weights, statistics and
# loss): the bound is C * 2**-8, each C the power of two at least 5x above the worst error
# `densenet parity-sweep -- --precision bfloat16` measured (seeds 0-15, 1 and 2 threads, every
# backend and pair; docs/precision.md).
ERROR_MODEL_BF16: dict[str, float] = {
    "inference": 32,  # worst measured 4.1 u (u = 2**-8)
    "train-forward": 32,  # 5.5 u
    "grad-input": 512,  # 81 u: BatchNorm's backward cancels, and its inputs carry bfloat16's rounding
    "grad-params": 256,  # 44 u (dense1.conv2.conv.weight)
    "running-stats": 8,  # 0.81 u: the statistics are float32 sums of bfloat16 activations
    "sgd-step": 8,  # 0.81 u (the running statistics after the step)
    "lockstep": 4,  # 0.46 u after 20 steps
    "momentum-step": 128,  # 19.5 u (a velocity: the gradient's rounding, as grad-params)
    "nesterov-step": 128,  # 19.5 u
    "momentum-lockstep": 4,  # 0.63 u after 20 Nesterov steps
}

# The optimisers of the momentum checks: the DenseNet paper's (momentum 0.9, weight decay 1e-4),
# heavy-ball and Nesterov, and the rate of each lockstep step: a linear warm-up over the first
# quarter, then cosine annealing (common.training.optim.LRSchedule over one "epoch" of `steps` steps).
PARITY_MOMENTUM = SGD(momentum=0.9, weight_decay=1e-4)
PARITY_NESTEROV = SGD(momentum=0.9, nesterov=True, weight_decay=1e-4)
PARITY_SCHEDULE = LRSchedule("cosine", warmup_epochs=0.25)
MOMENTUM_STEPS = (("momentum-step", PARITY_MOMENTUM), ("nesterov-step", PARITY_NESTEROV))


def parity_lrs(lr: float, steps: int) -> list[float]:
    """The rate of each momentum-lockstep step (``PARITY_SCHEDULE`` from ``lr``)."""
    return [PARITY_SCHEDULE.lr_at(lr, t, steps, 1) for t in range(steps)]


def parity_velocity(config: DenseNetConfig, grads: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The seeded velocities the one-step momentum checks start from (``<param>.momentum_buffer``):
    normal noise the size of each parameter's gradient ``grads``, so the velocity term weighs in."""
    rng = np.random.default_rng([seed, 1])
    return {
        f"{k}.momentum_buffer": (rng.standard_normal(g.shape) * np.max(np.abs(g))).astype(np.float32)
        for k, g in grads.items()
    }


# The strict claim of a float64 run: every figure, lockstep included, at or below this.
FLOAT64_CLAIM = 1e-9

CHECKS = tuple(ERROR_MODEL)


def bound(check: str, dtype: str, pairwise: bool = False) -> float:
    """The largest error ``check`` allows in ``dtype`` (the arithmetic: ``"bfloat16"`` for mixed
    precision): ``C * u`` in float32 and bfloat16, the claim in float64 (twice that between two
    backends, each within the bound of the oracle).

    In float64 the error is rounding times the network's conditioning, which grows with depth and
    with BatchNorms that average few values (docs/parity.md); the claim bounds all of it at once.
    """
    if dtype == "float64":
        value = FLOAT64_CLAIM
    else:
        value = (ERROR_MODEL_BF16 if dtype == "bfloat16" else ERROR_MODEL)[check] * UNIT_ROUNDOFF[dtype]
    return 2 * value if pairwise else value


@dataclass
class Comparison:
    """One check between a backend and the oracle (``b == "numpy"``) or between two backends."""

    check: str
    a: str
    b: str
    error: float  # largest |a - b| / scale over the check's tensors
    worst: str  # the tensor or stage with that error
    bound: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.bound

    @property
    def margin(self) -> float:
        """bound / error: how far inside its bound the check passed (inf for an exact match)."""
        return self.bound / self.error if self.error > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        margin = self.margin
        return {
            "check": self.check,
            "a": self.a,
            "b": self.b,
            "error": self.error,
            "bound": self.bound,
            "margin": margin if np.isfinite(margin) else None,
            "worst": self.worst,
            "passed": self.passed,
        }


@dataclass
class ParityReport:
    config: DenseNetConfig
    input_size: tuple[int, int]
    batch: int
    steps: int
    lr: float
    seed: int
    dtype: str
    participants: list[str]
    comparisons: list[Comparison] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    momentum_losses: dict[str, list[float]] = field(default_factory=dict)
    precision: str = "float32"

    @property
    def arithmetic(self) -> str:
        """What the backends compute in: the dtype, or bfloat16 in mixed precision."""
        return "bfloat16" if self.precision == "bfloat16" else self.dtype

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.passed for c in self.comparisons) and len(self.participants) > 1

    def worst(self) -> dict[str, Comparison]:
        """The comparison with the smallest margin per check (oracle and pairwise alike)."""
        return _worst_per_check(self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "input_size": list(self.input_size),
            "batch": self.batch,
            "steps": self.steps,
            "lr": self.lr,
            "seed": self.seed,
            "dtype": self.dtype,
            "precision": self.precision,
            "unit_roundoff": UNIT_ROUNDOFF[self.arithmetic],
            "error_model": dict(ERROR_MODEL_BF16 if self.arithmetic == "bfloat16" else ERROR_MODEL),
            "participants": self.participants,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "losses": self.losses,
            "momentum_losses": self.momentum_losses,
            "momentum": {"one step": [asdict(PARITY_MOMENTUM), asdict(PARITY_NESTEROV)], "lrs": self.lrs()},
            "errors": self.errors,
            "ok": self.ok,
        }

    def lrs(self) -> list[float]:
        """The rate of each momentum-lockstep step."""
        return parity_lrs(self.lr, self.steps) if self.steps else []

    def to_text(self) -> str:
        h, w = self.input_size
        lines = [
            f"DenseNet {self.config.describe()}; input {self.batch}x{self.config.in_channels}x{h}x{w}, "
            f"seed {self.seed}, {self.dtype}"
            + (" weights, bfloat16 mixed precision" if self.precision == "bfloat16" else "")
            + f", lr {self.lr:g}, {self.steps} lockstep steps",
            f"momentum checks: {PARITY_MOMENTUM.describe()} and {PARITY_NESTEROV.describe()} from seeded "
            f"velocities; momentum-lockstep: Nesterov, lr {self.lr:g} with a {PARITY_SCHEDULE.warmup_epochs:g} "
            "warm-up then cosine (changes every step)",
            f"identical canonical weights in: {', '.join(self.participants)} "
            "(numpy = common.oracle.reference, float64, the stand-in for exact arithmetic)",
            "error = max |a - b| / scale of the tensor; bound = "
            + (
                f"C x {UNIT_ROUNDOFF[self.arithmetic]:.3g} (unit roundoff)"
                if self.arithmetic != "float64"
                else f"{FLOAT64_CLAIM:g}, the float64 claim"
            ),
            "",
        ]
        rows = [_row(c) for c in self.comparisons if c.b == ORACLE]
        lines.append(_table(["check", "backend vs numpy", "error", "bound", "margin", "worst tensor", "result"], rows))
        worst_pairs = _worst_per_check(c for c in self.comparisons if c.b != ORACLE)
        if worst_pairs:
            rows = [_row(c) for c in worst_pairs.values()]
            lines += ["", "pairwise, the worst pair per check (bound: twice the oracle's)"]
            lines.append(_table(["check", "pair", "error", "bound", "margin", "worst tensor", "result"], rows))
        if self.losses.get(ORACLE):
            lines += [
                "",
                "lockstep losses (first, last): "
                + "; ".join(f"{n} {v[0]:.6f} -> {v[-1]:.6f}" for n, v in self.losses.items() if v),
                "momentum-lockstep losses (first, last): "
                + "; ".join(f"{n} {v[0]:.6f} -> {v[-1]:.6f}" for n, v in self.momentum_losses.items() if v),
            ]
        for name, error in self.errors.items():
            lines.append(f"{name}: ERROR {error}")
        failed = [c for c in self.comparisons if not c.passed]
        if self.ok:
            lines.append(f"\nOK: {len(self.comparisons)} comparisons within their bounds")
        else:
            lines.append(f"\nFAILED: {len(failed)} comparison(s) out of bound, {len(self.errors)} backend error(s)")
        return "\n".join(lines)


def _worst_per_check(comparisons: Iterable[Comparison]) -> dict[str, Comparison]:
    """The comparison with the smallest margin of each check, in the order checks first appear."""
    out: dict[str, Comparison] = {}
    for c in comparisons:
        if c.check not in out or c.margin < out[c.check].margin:
            out[c.check] = c
    return out


def _row(c: Comparison) -> list[str]:
    margin = c.margin
    return [
        c.check,
        f"{c.a} vs {c.b}",
        f"{c.error:.2e}",
        f"{c.bound:.2e}",
        f"{margin:.1f}x" if np.isfinite(margin) else "exact",
        c.worst,
        "pass" if c.passed else "FAIL",
    ]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _error(a: dict[str, np.ndarray], b: dict[str, np.ndarray], scales: dict[str, float]) -> tuple[float, str]:
    """Largest ``max |a - b| / scale`` over matching tensors, and the tensor it occurs in."""
    worst_error, worst = 0.0, ""
    for k in b:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        if x.shape != y.shape:
            return float("inf"), f"{k} (shape {x.shape} vs {y.shape})"
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = scales[k]
        e = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
        if not np.isfinite(d):
            e = float("inf")
        if e >= worst_error:
            worst_error, worst = e, k
    return worst_error, worst


def _max_abs(tensors: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.max(np.abs(v))) if np.size(v) else 0.0 for k, v in tensors.items()}


@dataclass
class _Oracle:
    """What the float64 oracle computes, with the scale of every tensor."""

    results: dict[str, dict[str, np.ndarray]]
    scales: dict[str, dict[str, float]]
    losses: list[float]
    velocity: dict[str, np.ndarray]  # where the one-step momentum checks start
    momentum_losses: list[float]


def _oracle(config, w0, batches, lr, steps, seed, momentum: bool = True) -> _Oracle:
    X, y = batches[0]
    results: dict[str, dict[str, np.ndarray]] = {}
    scales: dict[str, dict[str, float]] = {}
    for check, training in (("inference", False), ("train-forward", True)):
        logits, stages, _ = reference.forward(config, w0, X, training=training, dtype=np.float64)
        results[check] = {**stages, "logits": logits}
        scales[check] = _max_abs(results[check])
    g = reference_grad.loss_and_grads(config, w0, X, y)
    results["grad-input"], scales["grad-input"] = {"input": g.input}, {"input": g.input_scale}
    results["grad-params"], scales["grad-params"] = g.params, g.param_scales
    results["running-stats"], scales["running-stats"] = g.stats, g.stat_scales
    after = {k: np.asarray(v, np.float64) - lr * g.params[k] if k in g.params else v for k, v in w0.items()}
    after.update(g.stats)
    results["sgd-step"] = after
    scales["sgd-step"] = {**_max_abs({k: v for k, v in after.items() if k not in g.stats}), **g.stat_scales}
    losses, _ = reference_grad.sgd_steps(config, w0, batches[:steps], lr) if steps else ([], {})
    if steps:  # the losses as one more check, against the largest oracle loss
        results["lockstep"], scales["lockstep"] = {"loss": np.array(losses)}, {"loss": float(np.max(np.abs(losses)))}
    velocity = parity_velocity(config, g.params, seed)
    for check, sgd in MOMENTUM_STEPS if momentum else ():
        run = reference_grad.optimizer_steps(config, w0, batches[:1], [lr], sgd, velocity=velocity)
        results[check] = {**run.weights, **run.velocity}
        scales[check] = {**scales["sgd-step"], **_max_abs(run.velocity), **run.velocity_scales}
        scales[check].update(_max_abs({k: v for k, v in run.weights.items() if k in g.params}))
    momentum_losses: list[float] = []
    if steps and momentum:
        run = reference_grad.optimizer_steps(config, w0, batches[:steps], parity_lrs(lr, steps), PARITY_NESTEROV)
        momentum_losses = run.losses
        results["momentum-lockstep"] = {"loss": np.array(momentum_losses)}
        scales["momentum-lockstep"] = {"loss": float(np.max(np.abs(momentum_losses)))}
    return _Oracle(results, scales, losses, velocity, momentum_losses)


def run_parity(
    backends: list[str] | None = None,
    config: DenseNetConfig | None = None,
    input_size: int | tuple[int, int] = 32,
    batch: int = 8,
    steps: int = 20,
    lr: float = 0.01,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    dtype: str = "float32",
    momentum: bool = True,
    precision: str = "float32",
) -> ParityReport:
    """Run every check on every backend against the oracle and pairwise (module docstring);
    without ``momentum``, the plain-SGD checks only (the momentum checks cost about a third more).
    ``precision="bfloat16"`` runs the backends in mixed precision, against the same oracle."""
    dtype = check_dtype(dtype)
    precision = check_precision(precision, dtype)
    config = config or PARITY_CASE
    input_size = plan(config, input_size).input_size
    report = ParityReport(config, input_size, batch, steps, lr, seed, dtype, [ORACLE], precision=precision)
    adapters = _load_adapters(backends, report)
    say = progress or (lambda message: None)
    case = _Case(config, init_canonical(config, seed), seeded_batches(config, input_size, batch, max(steps, 1), seed))
    say("numpy: the float64 oracle (forward, gradients, lockstep steps)")
    oracle = _oracle(config, case.w0, case.batches, lr, steps, seed, momentum)
    report.losses[ORACLE] = oracle.losses
    if momentum:
        report.momentum_losses[ORACLE] = oracle.momentum_losses
    # results[check][participant] = {tensor name: array}
    results: dict[str, dict[str, dict[str, np.ndarray]]] = {k: {} for k in oracle.results}
    for name, adapter in adapters.items():
        try:
            for check, tensors in _backend_results(adapter, case, oracle, report, momentum, say).items():
                results[check][name] = tensors
        except Exception as exc:  # one backend failing is a result, not a crash
            report.errors[name] = f"{type(exc).__name__}: {exc}"
            report.losses.pop(name, None)
            report.momentum_losses.pop(name, None)
    if steps:
        results["lockstep"] = {n: {"loss": np.array(v)} for n, v in report.losses.items() if n != ORACLE}
        if momentum:
            results["momentum-lockstep"] = {
                n: {"loss": np.array(v)} for n, v in report.momentum_losses.items() if n != ORACLE
            }
    _compare(report, results, oracle)
    return report


@dataclass
class _Case:
    """The canonical starting weights and the seeded batches every participant gets."""

    config: DenseNetConfig
    w0: dict[str, np.ndarray]
    batches: list[tuple[np.ndarray, np.ndarray]]


def _load_adapters(backends: list[str] | None, report: ParityReport) -> dict[str, Adapter]:
    """The backends that load; one named in ``backends`` that cannot is an error of the report."""
    names = [canonical_name(b) for b in backends] if backends else list(BACKENDS)
    adapters: dict[str, Adapter] = {}
    for name in dict.fromkeys(names):
        try:
            adapters[name] = load_backend(name)
            report.participants.append(name)
        except BackendUnavailable as exc:
            if backends:
                report.errors[name] = str(exc)
    return adapters


def _backend_results(
    adapter: Adapter, case: _Case, oracle: _Oracle, report: ParityReport, momentum: bool, say: Callable[[str], None]
) -> dict[str, dict[str, np.ndarray]]:
    """Every check's tensors of one backend; its lockstep losses go into ``report``."""
    name, w0, lr, steps = adapter.name, case.w0, report.lr, report.steps
    (X, y), batches = case.batches[0], case.batches[:steps]
    out: dict[str, dict[str, np.ndarray]] = {}
    say(f"{name}: building in {report.arithmetic} and loading the canonical weights")
    model = adapter.build(case.config, seed=report.seed, dtype=report.dtype, precision=report.precision)
    for check, training in (("inference", False), ("train-forward", True)):
        adapter.set_weights(model, w0)
        s = adapter.stages(model, X, training=training)
        out[check] = {**s, "logits": s["head"]}
    say(f"{name}: gradients")
    adapter.set_weights(model, w0)
    _, dX, grads = adapter.loss_and_grads(model, X, y)
    out["grad-input"], out["grad-params"] = {"input": dX}, grads
    out["running-stats"] = {k: v for k, v in adapter.get_weights(model).items() if k in oracle.results["running-stats"]}
    say(f"{name}: SGD steps")
    adapter.set_weights(model, w0)
    adapter.train_step(model, X, y, lr)
    out["sgd-step"] = adapter.get_weights(model)
    adapter.set_weights(model, w0)
    # The lockstep runs through the training engine, eagerly, losses kept as they come.
    eager = LocalGroup(adapter, compiled=False)
    report.losses[name] = Engine(eager, adapter, model, lambda step: lr, check_finite=False).run_steps(batches)
    if not momentum:
        return out
    say(f"{name}: momentum steps (its own optimizer, configured to the suite's SGD)")
    for check, sgd in MOMENTUM_STEPS:
        adapter.set_weights(model, w0)
        adapter.configure_optimizer(model, sgd)
        adapter.set_optimizer_state(model, oracle.velocity)
        adapter.train_step(model, X, y, lr)
        out[check] = {**adapter.get_weights(model), **adapter.get_optimizer_state(model)}
    adapter.set_weights(model, w0)
    adapter.configure_optimizer(model, PARITY_NESTEROV)
    lockstep = Engine(eager, adapter, model, report.lrs().__getitem__, check_finite=False)
    report.momentum_losses[name] = lockstep.run_steps(batches)
    return out


def _compare(report: ParityReport, results: dict[str, dict[str, dict[str, np.ndarray]]], oracle: _Oracle) -> None:
    """Every participant against the oracle and pairwise, per check, into ``report.comparisons``."""
    for check, per in results.items():
        values = {ORACLE: oracle.results[check], **per}
        for a, b in [*((name, ORACLE) for name in per), *itertools.combinations(per, 2)]:
            limit = bound(check, report.arithmetic, pairwise=b != ORACLE)
            error, worst = _error(values[a], values[b], oracle.scales[check])
            if check in ("lockstep", "momentum-lockstep"):
                worst = _first_step(values[a]["loss"], values[b]["loss"], oracle.scales[check]["loss"], limit)
            report.comparisons.append(Comparison(check, a, b, error, worst, limit))


def summarize(reports: list[ParityReport]) -> dict[str, dict[str, Any]]:
    """The worst comparison per check over several reports (seeds, machines, settings)."""
    out: dict[str, dict[str, Any]] = {}
    for report in reports:
        for c in report.worst().values():
            if c.check not in out or c.margin < out[c.check]["margin"]:
                out[c.check] = {
                    "error": c.error,
                    "bound": c.bound,
                    "margin": c.margin,
                    "where": f"seed {report.seed}, {c.a} vs {c.b}, {c.worst}",
                }
    return {check: out[check] for check in CHECKS if check in out}


def _first_step(a: np.ndarray, b: np.ndarray, scale: float, limit: float) -> str:
    """Where a lockstep run's losses first leave the bound (or the step of the largest error)."""
    errors = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / scale
    bad = np.flatnonzero(~(errors <= limit))
    step = int(bad[0]) if bad.size else int(np.argmax(errors))
    return f"loss at step {step + 1}" + (" (first out of bound)" if bad.size else "")


# The network `densenet parity` checks by default: narrow enough that float32's discrete events
# (a ReLU input or max-pool near-tie rounding to the other side) stay out of 20 lockstep steps.
PARITY_CASE = DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2))


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float, str]:
    """Largest absolute and norm-wise relative difference over matching tensors (``--naive``)."""
    max_abs, max_rel, worst = 0.0, 0.0, ""
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = max(float(np.max(np.abs(x))) if x.size else 0.0, float(np.max(np.abs(y))) if y.size else 0.0)
        rel = d / scale if scale > 0 else d
        max_abs = max(max_abs, d)
        if rel >= max_rel:
            max_rel, worst = rel, k
    return max_abs, max_rel, worst


__all__ = ["CHECKS", "ERROR_MODEL", "FLOAT64_CLAIM", "ORACLE", "PARITY_CASE", "bound", "run_parity"]


@dataclass
class NaiveRow:
    """What one framework default would change, measured with the numpy oracle."""

    default: str
    frameworks: str
    affects: str
    max_abs: float
    max_rel: float


def run_naive(
    config: DenseNetConfig | None = None,
    input_size: int | tuple[int, int] = 32,
    batch: int = 8,
    seed: int = 0,
    backends: list[str] | None = None,
) -> list[NaiveRow]:
    """The cost of each framework default the suite aligns away, on the same weights and input.

    Each row compares the oracle with the aligned conventions against the oracle with one
    framework's default (``common.oracle.reference.Conventions``), so it measures the default itself,
    not a framework's rounding. The optimiser rows also run the stock optimizers of ``backends``.
    """
    config = config or DenseNetConfig()
    input_size = plan(config, input_size).input_size
    w = init_canonical(config, seed)
    ((X, _),) = seeded_batches(config, input_size, batch, 1, seed)
    aligned = reference.ALIGNED

    def run(conventions: reference.Conventions, training: bool, X=X, dtype=np.float64, weights=w):
        logits, stages, stats = reference.forward(
            config, weights, X, training=training, conventions=conventions, dtype=dtype
        )
        return {**stages, "logits": logits}, stats

    rows = []

    def add(default: str, frameworks: str, affects: str, a: dict, b: dict) -> None:
        rows.append(NaiveRow(default, frameworks, affects, *_diff(a, b)[:2]))

    keras_eps = reference.Conventions(eps=1e-3)
    add("BN epsilon 1e-3", "Keras", "inference logits and stages", run(aligned, False)[0], run(keras_eps, False)[0])
    add("BN epsilon 1e-3", "Keras", "training-mode logits and stages", run(aligned, True)[0], run(keras_eps, True)[0])
    same = reference.Conventions(same_padding=True)
    add(
        "'same' padding on the stride-2 stem",
        "TF, Flax (the book)",
        "inference logits and stages",
        run(aligned, False)[0],
        run(same, False)[0],
    )
    fast = reference.Conventions(fast_variance=True)
    for shift in (0.0, 100.0):
        Xs = X + np.float32(shift)
        add(
            f"fast variance E[x^2]-E[x]^2, float32, input mean {0.5 + shift:g}",
            "Flax",
            "training-mode logits and stages",
            run(aligned, True, Xs, np.float32)[0],
            run(fast, True, Xs, np.float32)[0],
        )
    _, stats = run(aligned, True)
    for name, conventions in (
        ("momentum 0.99 (0.01 in PyTorch's meaning)", reference.Conventions(momentum=0.01)),
        ("running variance fed the biased batch variance", reference.Conventions(unbiased_running_var=False)),
    ):
        _, other = run(conventions, True)
        frameworks = "Keras, Flax" if "momentum" in name else "MXNet, Keras, Flax"
        add(name, frameworks, "running statistics after one step", stats, other)
        after, after_other = {**w, **stats}, {**w, **other}
        add(
            name,
            frameworks,
            "inference logits after one step",
            {"logits": run(aligned, False, weights=after)[0]["logits"]},
            {"logits": run(aligned, False, weights=after_other)[0]["logits"]},
        )
    rows += _naive_optimizer_rows(config, input_size, batch, seed, backends or [])
    return rows


def _naive_optimizer_rows(
    config: DenseNetConfig, input_size: tuple[int, int], batch: int, seed: int, backends: list[str], steps: int = 20
) -> list[NaiveRow]:
    """The frameworks' own readings of momentum and weight decay against the suite's (PyTorch's).

    With the oracle: ``steps`` Nesterov steps of the momentum-lockstep recipe trained under each
    convention (``common.training.optim.Convention``). With each installed framework's stock optimizer
    (``densenet_<fw>.optim.apply_steps``): the oracle's gradients of those steps, in turn, fed to the
    stock optimizer and to the suite's definition, on ``head.fc.weight``, in float64.
    """
    import importlib

    w = init_canonical(config, seed)
    batches = seeded_batches(config, input_size, batch, steps, seed)
    lrs = parity_lrs(0.01, steps)
    constant = [0.01] * steps
    heavy = PARITY_MOMENTUM
    suite = reference_grad.optimizer_steps(config, w, batches, lrs, heavy)
    rows = []
    after = f"weights after {steps} steps, lr changing every step"
    for default, frameworks, conv, rates, affects in (
        ("learning rate folded into the velocity", "MXNet sgd/nag, Keras SGD", FOLDED_LR, lrs, after),
        (
            "learning rate folded into the velocity",
            "MXNet sgd/nag, Keras SGD",
            FOLDED_LR,
            constant,
            f"weights after {steps} steps, constant lr (no change expected)",
        ),
        ("decoupled weight decay", "Keras 3 weight_decay", Convention(decoupled_weight_decay=True), lrs, after),
        ("both: folded rate, decoupled decay", "Keras SGD(weight_decay=)", DECOUPLED_WEIGHT_DECAY, lrs, after),
    ):
        base = suite if rates is lrs else reference_grad.optimizer_steps(config, w, batches, rates, heavy)
        other = reference_grad.optimizer_steps(config, w, batches, rates, heavy, convention=conv)
        rows.append(
            NaiveRow(f"{default} ({heavy.describe()})", frameworks, affects, *_diff(base.weights, other.weights)[:2])
        )
    # The real stock optimizers, open loop: the gradients of the suite's run, one tensor.
    grads: list[np.ndarray] = []
    wk, vk = {k: np.asarray(v, np.float64) for k, v in w.items()}, {}
    for (X, y), lr in zip(batches, lrs):
        g = reference_grad.loss_and_grads(config, wk, X, y)
        grads.append(g.params["head.fc.weight"])
        for k, grad in g.params.items():
            wk[k], vk[k] = sgd_update(wk[k], grad, vk.get(k), lr, heavy)
        wk.update(g.stats)
    w0 = np.asarray(w["head.fc.weight"], np.float64)
    for name in backends:
        optim = importlib.import_module(f"{BACKENDS[name].package}.optim")
        for sgd in (heavy, PARITY_NESTEROV):
            ours = optim.apply_steps(w0, grads, lrs, sgd)
            stock = optim.apply_steps(w0, grads, lrs, sgd, stock=True)
            rows.append(
                NaiveRow(
                    f"{name} stock optimizer ({optim.STOCK}), {sgd.describe()}",
                    name,
                    f"head.fc.weight after {steps} given gradients, lr changing",
                    *_diff({"w": ours}, {"w": stock})[:2],
                )
            )
    return rows


# Environment of each setting `densenet parity-sweep` measures: the thread count every framework
# uses (what `--threads` sets, common.process.threads), and oneDNN (MKL-DNN) on or off where a
# framework can switch it (TensorFlow and MXNet by environment variable, PyTorch through
# densenet_torch's DENSENET_ONEDNN; XLA does not use it).
def sweep_environment(threads: int, onednn: bool) -> dict[str, str]:
    """Variables that pin every framework to ``threads`` threads and turn oneDNN on or off."""
    flag = "1" if onednn else "0"
    return {
        **thread_environment(threads),
        "TF_ENABLE_ONEDNN_OPTS": flag,
        "MXNET_MKLDNN_ENABLED": flag,
        "DENSENET_ONEDNN": flag,
    }


@dataclass
class SweepRow:
    """The worst error of one check in one setting, over every seed, backend and pair."""

    setting: str
    check: str
    error: float
    bound: float
    where: str

    @property
    def margin(self) -> float:
        return self.bound / self.error if self.error > 0 else float("inf")


def run_sweep(
    parity_args: list[str],
    seeds: list[int],
    threads: list[int],
    onednn: list[bool],
    timeout_s: float = 3600,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[SweepRow], list[str]]:
    """``densenet parity --seeds ... --json`` in a fresh process per setting; the worst per check.

    Returns the rows and the failures (a setting whose run failed or went out of bound).
    """
    import json
    import os
    import subprocess
    import sys

    say = progress or (lambda message: None)
    rows: list[SweepRow] = []
    failures: list[str] = []
    seed_arg = ",".join(map(str, seeds))
    for n, on in itertools.product(threads, onednn):
        setting = f"{n} thread{'s' if n > 1 else ''}, oneDNN {'on' if on else 'off'}"
        say(f"{setting}: seeds {seed_arg}")
        env = {**os.environ, **sweep_environment(n, on)}
        cmd = [sys.executable, "-m", "common", "parity", *parity_args, "--seeds", seed_arg, "--json"]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            failures.append(f"{setting}: no answer within {timeout_s:g} s")
            continue
        try:
            out = json.loads(done.stdout)
        except json.JSONDecodeError:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            failures.append(f"{setting}: exit {done.returncode}: {' | '.join(tail)}")
            continue
        reports = out["reports"] if "reports" in out else [out]
        for report in reports:
            if report["errors"]:
                failures.append(f"{setting}, seed {report['seed']}: {report['errors']}")
        worst: dict[str, SweepRow] = {}
        for report in reports:
            for c in report["comparisons"]:
                row = SweepRow(
                    setting,
                    c["check"],
                    c["error"],
                    c["bound"],
                    f"seed {report['seed']}, {c['a']} vs {c['b']}, {c['worst']}",
                )
                if not c["passed"]:
                    failures.append(f"{setting}: {c['check']} {row.where}: {c['error']:.2e} > {c['bound']:.2e}")
                if c["check"] not in worst or row.margin < worst[c["check"]].margin:
                    worst[c["check"]] = row
        rows += [worst[check] for check in CHECKS if check in worst]
    return rows, failures


def sweep_markdown(rows: list[SweepRow]) -> str:
    """The margin table of a sweep: every setting, then the worst over all settings per check."""
    lines = ["| setting | check | worst error | bound | margin | where |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.setting} | {r.check} | {r.error:.2e} | {r.bound:.2e} | {r.margin:.1f}x | {r.where} |" for r in rows
    ]
    if rows:
        lines += ["", "| check | worst error, all settings | bound | margin |", "|---|---|---|---|"]
        for check in dict.fromkeys(r.check for r in rows):
            worst = min((r for r in rows if r.check == check), key=lambda r: r.margin)
            lines.append(f"| {check} | {worst.error:.2e} | {worst.bound:.2e} | {worst.margin:.1f}x |")
    return "\n".join(lines)
