"""Numerical parity: identical canonical weights and inputs, the same numbers from every backend.

Participants are the installed backends plus ``numpy``, the plain reference implementation in
``common.reference`` (float64), so no framework is "the truth". Every comparison is pairwise.

Checks, in order (each starts again from the same initial weights):

1. ``inference``: logits and every stage's activations with running statistics;
2. ``train-forward``: the same in training mode (batch statistics);
3. ``grad-input`` / ``grad-params``: gradient of the mean cross-entropy w.r.t. input and weights
   (``grad-conv-bias``: the conv biases, whose gradient is zero up to rounding, by absolute error);
4. ``running-stats``: BatchNorm running statistics after one training step;
5. ``sgd-step``: every tensor after one plain SGD step; ``lockstep``: the loss over ``steps``
   SGD steps on the same batches in the same order.

Errors: ``abs`` is the largest absolute difference; ``rel`` divides it by the largest magnitude
of the two tensors (a norm-wise relative error, stable where values cross zero).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common import reference
from common.adapter import Adapter
from common.arch import bn_counts  # re-exported: tests and callers import it from here
from common.config import BN_MOMENTUM, DenseNetConfig, is_state, plan
from common.errors import BackendUnavailable
from common.registry import BACKENDS, canonical_name, load_backend

ORACLE = "numpy"


@dataclass(frozen=True)
class Tolerance:
    abs: float | None = None
    rel: float | None = None

    def ok(self, max_abs: float, max_rel: float) -> bool:
        return (self.abs is None or max_abs <= self.abs) and (self.rel is None or max_rel <= self.rel)

    def __str__(self) -> str:
        parts = [f"abs<={self.abs:g}" if self.abs is not None else "", f"rel<={self.rel:g}" if self.rel else ""]
        return " ".join(p for p in parts if p)


# Float32 on CPU, measured with `densenet parity` on the parity case over seeds 0-3 and on the
# d2l network (docs/parity.md); each bound sits above the largest error seen and inside the
# issue's targets (activations 1e-4 abs, gradients 1e-3 rel, lockstep losses 1e-3).
TOLERANCES: dict[str, Tolerance] = {
    "inference": Tolerance(abs=2e-5),  # worst seen 8.4e-6 (d2l)
    "train-forward": Tolerance(abs=2e-5),  # 9.8e-6 (d2l)
    "grad-input": Tolerance(rel=2e-5),  # 7.4e-6 (d2l)
    "grad-params": Tolerance(rel=1e-3),  # 9.2e-4 (parity case, stem BatchNorm scale)
    # Every conv feeds a training-mode BatchNorm, which subtracts the batch mean, so the conv
    # biases' gradients are exactly zero in exact arithmetic: only rounding noise is compared.
    "grad-conv-bias": Tolerance(abs=1e-5),  # 5.5e-6 (d2l)
    "running-stats": Tolerance(abs=2e-6),  # 2.4e-7
    "sgd-step": Tolerance(abs=2e-6),  # 2.4e-7
    "lockstep": Tolerance(abs=3e-4),  # 2.9e-5 over 20 steps (parity case); the d2l network diverges
}

# The network `densenet parity` checks by default: narrow enough that float32's discrete events
# (a ReLU input or max-pool near-tie rounding to the other side) stay out of 20 lockstep steps.
PARITY_CASE = DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2))


@dataclass
class Comparison:
    check: str
    a: str
    b: str
    max_abs: float
    max_rel: float
    worst: str  # the tensor or stage with the largest relative error
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return self.tolerance.ok(self.max_abs, self.max_rel)


@dataclass
class ParityReport:
    config: DenseNetConfig
    input_size: tuple[int, int]
    batch: int
    steps: int
    lr: float
    seed: int
    participants: list[str]
    comparisons: list[Comparison] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.passed for c in self.comparisons) and len(self.participants) > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "input_size": list(self.input_size),
            "batch": self.batch,
            "steps": self.steps,
            "lr": self.lr,
            "seed": self.seed,
            "participants": self.participants,
            "comparisons": [
                {
                    **{k: v for k, v in asdict(c).items() if k != "tolerance"},
                    "tolerance": str(c.tolerance),
                    "passed": c.passed,
                }
                for c in self.comparisons
            ],
            "losses": self.losses,
            "errors": self.errors,
            "ok": self.ok,
        }


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float, str]:
    """Largest absolute and norm-wise relative difference over matching tensors."""
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


def align_running_var(
    weights: dict[str, np.ndarray], initial: dict[str, np.ndarray], counts: dict[str, int]
) -> dict[str, np.ndarray]:
    """Running variances fed the biased batch variance, re-expressed as if fed the unbiased one.

    After one update new = (1-m)*old + m*v, so the batch term is new - (1-m)*old; PyTorch's
    convention scales that term by n/(n-1). Only valid one update away from ``initial``.
    """
    out = dict(weights)
    for k, v in weights.items():
        if k.endswith("running_var"):
            n = counts[k.rsplit(".bn.", 1)[0]]
            carried = (1 - BN_MOMENTUM) * initial[k]
            out[k] = carried + (v - carried) * (n / (n - 1))
    return out


def make_batches(config: DenseNetConfig, input_size: tuple[int, int], batch: int, count: int, seed: int):
    """``count`` seeded (X, y) batches: NCHW float32 in [0, 1) and integer labels."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((batch, config.in_channels, *input_size), dtype=np.float32),
            rng.integers(0, config.num_classes, size=batch),
        )
        for _ in range(count)
    ]


def run_parity(
    backends: list[str] | None = None,
    config: DenseNetConfig | None = None,
    input_size: int | tuple[int, int] = 32,
    batch: int = 8,
    steps: int = 20,
    lr: float = 0.1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Run every check on every pair of participants (see the module docstring)."""
    from common.weights import init_canonical

    config = config or PARITY_CASE
    input_size = plan(config, input_size).input_size
    names = [canonical_name(b) for b in backends] if backends else list(BACKENDS)
    adapters: dict[str, Adapter] = {}
    report = ParityReport(config, input_size, batch, steps, lr, seed, [ORACLE])
    for name in dict.fromkeys(names):
        try:
            adapters[name] = load_backend(name)
            report.participants.append(name)
        except BackendUnavailable as exc:
            if backends:
                report.errors[name] = str(exc)

    w0 = init_canonical(config, seed)
    (X, y), *_ = batches = make_batches(config, input_size, batch, max(steps, 1), seed)
    counts = bn_counts(config, input_size, batch)
    say = progress or (lambda message: None)

    # results[check][participant] = {tensor name: array}
    results: dict[str, dict[str, dict[str, np.ndarray]]] = {
        k: {}
        for k in (
            "inference",
            "train-forward",
            "grad-input",
            "grad-params",
            "grad-conv-bias",
            "running-stats",
            "sgd-step",
        )
    }
    logits, stages, _ = reference.forward(config, w0, X, training=False, dtype=np.float64)
    results["inference"][ORACLE] = {**stages, "logits": logits}
    logits, stages, stats = reference.forward(config, w0, X, training=True, dtype=np.float64)
    results["train-forward"][ORACLE] = {**stages, "logits": logits}
    results["running-stats"][ORACLE] = stats

    for name, adapter in adapters.items():
        try:
            say(f"{name}: building and loading the canonical weights")
            model = adapter.build(config, seed=seed)
            adapter.set_weights(model, w0)
            s = adapter.stages(model, X, training=False)
            results["inference"][name] = {**s, "logits": s["head"]}
            adapter.set_weights(model, w0)
            s = adapter.stages(model, X, training=True)
            results["train-forward"][name] = {**s, "logits": s["head"]}

            say(f"{name}: gradients")
            adapter.set_weights(model, w0)
            _, dX, grads = adapter.loss_and_grads(model, X, y)
            results["grad-input"][name] = {"input": dX}
            results["grad-params"][name] = {k: g for k, g in grads.items() if not k.endswith("conv.bias")}
            results["grad-conv-bias"][name] = {k: g for k, g in grads.items() if k.endswith("conv.bias")}
            stats = {k: v for k, v in adapter.get_weights(model).items() if is_state(k)}
            if not adapter.running_var_unbiased:
                stats = align_running_var(stats, w0, counts)
            results["running-stats"][name] = stats

            say(f"{name}: SGD steps")
            adapter.set_weights(model, w0)
            adapter.sgd_step(model, X, y, lr)
            after = adapter.get_weights(model)
            if not adapter.running_var_unbiased:
                after = align_running_var(after, w0, counts)
            results["sgd-step"][name] = after
            adapter.set_weights(model, w0)
            report.losses[name] = [adapter.sgd_step(model, Xb, yb, lr) for Xb, yb in batches[:steps]]
        except Exception as exc:  # one backend failing is a result, not a crash
            report.errors[name] = f"{type(exc).__name__}: {exc}"
            for per in results.values():
                per.pop(name, None)
            report.losses.pop(name, None)

    for check, per in results.items():
        for a, b in itertools.combinations(per, 2):
            report.comparisons.append(Comparison(check, a, b, *_diff(per[a], per[b]), TOLERANCES[check]))
    for a, b in itertools.combinations(report.losses, 2):
        la, lb = {"loss": np.array(report.losses[a])}, {"loss": np.array(report.losses[b])}
        max_abs, max_rel, _ = _diff(la, lb)
        report.comparisons.append(Comparison("lockstep", a, b, max_abs, max_rel, "loss", TOLERANCES["lockstep"]))
    return report


@dataclass
class NaiveRow:
    """What one framework default would change, measured with the numpy oracle."""

    default: str
    frameworks: str
    affects: str
    max_abs: float
    max_rel: float


def run_naive(
    config: DenseNetConfig | None = None, input_size: int | tuple[int, int] = 32, batch: int = 8, seed: int = 0
) -> list[NaiveRow]:
    """The cost of each framework default the suite aligns away, on the same weights and input.

    Each row compares the oracle with the aligned conventions against the oracle with one
    framework's default (``common.reference.Conventions``), so it measures the default itself,
    not a framework's rounding.
    """
    from common.weights import init_canonical

    config = config or DenseNetConfig()
    input_size = plan(config, input_size).input_size
    w = init_canonical(config, seed)
    ((X, _),) = make_batches(config, input_size, batch, 1, seed)
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
    return rows
