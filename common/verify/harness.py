"""The shape harness: identical seeded inputs to every backend, compared stage by stage.

Each backend's per-stage output shapes (NCHW) are compared with each other and with the channel
plan that ``common.arch.plan`` derives before any framework runs.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.arch import NetworkPlan, plan
from common.config import DenseNetConfig
from common.errors import BackendUnavailable, DenseNetError
from common.registry import BACKENDS, canonical_name, load_backend
from common.render import format_table


def seeded_batches(
    config: DenseNetConfig, input_size: tuple[int, int], batch: int, count: int = 1, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` seeded ``(X, y)`` batches drawn in turn from one generator: NCHW float32 images in
    [0, 1) (the range of scaled Fashion-MNIST pixels) and int64 labels. The one maker of the seeded
    inputs that ``compare``, ``summary``, ``parity`` and the golden vectors feed every backend."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((batch, config.in_channels, *input_size), dtype=np.float32),
            rng.integers(0, config.num_classes, size=batch, dtype=np.int64),
        )
        for _ in range(count)
    ]


@dataclass
class BackendRun:
    """What one backend produced (or why it could not run)."""

    name: str
    framework: str
    status: str  # "ok", "unavailable" or "error"
    version: str | None = None
    error: str | None = None
    stages: dict[str, tuple[int, ...]] = field(default_factory=dict)
    num_params: int | None = None
    num_state: int | None = None
    build_s: float | None = None
    forward_s: float | None = None


@dataclass
class ShapeReport:
    """The comparison of every backend against the plan and against each other."""

    plan: NetworkPlan
    batch: int
    seed: int
    runs: list[BackendRun]
    required: list[str]
    dtype: str = "float32"
    precision: str = "float32"

    def expected(self) -> dict[str, tuple[int, ...]]:
        return self.plan.shapes(self.batch)

    def ran(self) -> list[BackendRun]:
        return [r for r in self.runs if r.status == "ok"]

    def stage_agrees(self, stage: str) -> bool:
        expected = self.expected()[stage]
        return all(r.stages.get(stage) == expected for r in self.ran())

    @property
    def failures(self) -> list[str]:
        """Why the comparison fails; empty when every backend that ran agrees with the plan."""
        out = []
        for r in self.runs:
            if r.status == "error":
                out.append(f"{r.name}: {r.error}")
            elif r.status == "unavailable" and r.name in self.required:
                out.append(f"{r.name} was requested but cannot load: {r.error}")
        for stage in self.expected():
            if self.ran() and not self.stage_agrees(stage):
                got = ", ".join(f"{r.name}={r.stages.get(stage)}" for r in self.ran())
                out.append(f"stage {stage}: expected {self.expected()[stage]}, got {got}")
        for r in self.ran():
            if r.num_params != self.plan.num_params:
                out.append(f"{r.name}: {r.num_params} parameters, expected {self.plan.num_params}")
        if not self.ran():
            out.append("no backend could run")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        expected = self.expected()
        return {
            "config": self.plan.config.to_dict(),
            "input_size": list(self.plan.input_size),
            "batch": self.batch,
            "seed": self.seed,
            "dtype": self.dtype,
            "precision": self.precision,
            "expected_params": self.plan.num_params,
            "macs_per_image": self.plan.macs,
            "stages": [
                {
                    "stage": stage,
                    "expected": list(shape),
                    "shapes": {r.name: list(r.stages[stage]) for r in self.ran() if stage in r.stages},
                    "agree": self.stage_agrees(stage),
                }
                for stage, shape in expected.items()
            ],
            "backends": [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(r).items() if k != "stages"}
                for r in self.runs
            ],
            "ok": self.ok,
            "failures": self.failures,
        }

    def to_text(self) -> str:
        """The stage and backend tables for people, ending with the verdict when the comparison
        passes; when it fails, :attr:`failures` says why (the CLI writes them on stderr)."""
        config = self.plan.config
        h, w = self.plan.input_size
        ran = self.ran()
        stage_rows = [
            [stage, str(expected), *[str(r.stages.get(stage, "-")) for r in ran]]
            + ["yes" if self.stage_agrees(stage) else "NO"]
            for stage, expected in self.expected().items()
        ]
        backend_rows = [
            [
                r.name,
                r.version or "-",
                f"{r.num_params:,}" if r.num_params is not None else "-",
                f"{r.num_state:,}" if r.num_state is not None else "-",
                f"{r.build_s:.2f}" if r.build_s is not None else "-",
                f"{r.forward_s * 1000:.1f}" if r.forward_s is not None else "-",
                {"ok": "ok", "unavailable": "unavailable", "error": "ERROR"}[r.status],
            ]
            for r in self.runs
        ]
        lines = [
            f"DenseNet {config.describe()}",
            f"input: {self.batch}x{config.in_channels}x{h}x{w} (NCHW), seeded uniform [0, 1), seed {self.seed}, "
            f"{self.dtype}" + (" weights, bfloat16 mixed precision" if self.precision == "bfloat16" else ""),
            "shapes are NCHW whatever the framework's own layout",
            "",
            format_table(["stage", "expected", *[r.name for r in ran], "agree"], stage_rows),
            "",
            format_table(["backend", "version", "params", "BN stats", "build s", "forward ms", "status"], backend_rows),
            "",
            f"expected parameters: {self.plan.num_params:,}; "
            f"forward cost: {self.plan.macs / 1e6:.1f} M multiply-adds per image",
        ]
        lines += [
            f"note: {r.name} skipped: {r.error}"
            for r in self.runs
            if r.status == "unavailable" and r.name not in self.required
        ]
        if self.ok:
            lines.append(f"OK: {len(ran)} backend(s) agree with each other and with the plan")
        return "\n".join(lines)


def run_backend(
    name: str,
    config: DenseNetConfig,
    X: np.ndarray,
    *,
    seed: int = 0,
    dtype: str = "float32",
    precision: str = "float32",
) -> BackendRun:
    """Build one backend's network in ``dtype`` (and ``precision``) and record its stage shapes;
    never raises for the backend."""
    framework = BACKENDS[name].framework
    try:
        adapter = load_backend(name)
    except BackendUnavailable as exc:
        return BackendRun(name, framework, "unavailable", error=str(exc))
    run = BackendRun(name, adapter.framework, "ok", version=adapter.version())
    try:
        start = time.perf_counter()
        model = adapter.build(config, seed=seed, dtype=dtype, precision=precision)
        run.build_s = time.perf_counter() - start
        start = time.perf_counter()
        stages = adapter.stages(model, X)
        run.forward_s = time.perf_counter() - start
        run.stages = {k: tuple(int(d) for d in v.shape) for k, v in stages.items()}
        run.num_params = adapter.num_params(model)
        run.num_state = adapter.num_state(model)
        bad = [k for k, v in stages.items() if not np.all(np.isfinite(v))]
        if bad:
            raise DenseNetError(f"non-finite values in stage(s) {', '.join(bad)}")
        wrong = sorted({str(v.dtype) for v in stages.values()} - {dtype})
        if wrong:  # a framework that silently computes in another precision
            raise DenseNetError(f"asked for {dtype}, but the stages came out as {', '.join(wrong)}")
    except Exception as exc:  # a backend failing is a result to report, not a crash
        run.status = "error"
        detail = "" if isinstance(exc, DenseNetError) else "\n" + traceback.format_exc(limit=3)
        run.error = f"{type(exc).__name__}: {exc}{detail}"
    return run


def compare_shapes(
    backends: list[str] | None = None,
    config: DenseNetConfig | None = None,
    input_size: int | tuple[int, int] = 96,
    batch: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    precision: str = "float32",
) -> ShapeReport:
    """Feed one seeded batch to each backend (all when ``backends`` is None) and compare shapes.

    Backends named explicitly are required: one that cannot load makes the report fail.
    """
    config = config or DenseNetConfig()
    network_plan = plan(config, input_size)  # refuses impossible sizes before any framework loads
    if batch < 1:
        raise DenseNetError(f"batch size must be at least 1, got {batch}")
    names = [canonical_name(b) for b in backends] if backends else list(BACKENDS)
    names = list(dict.fromkeys(names))
    ((X, _),) = seeded_batches(config, network_plan.input_size, batch, 1, seed)
    runs = [run_backend(name, config, X, seed=seed, dtype=dtype, precision=precision) for name in names]
    required = names if backends else []
    return ShapeReport(network_plan, batch, seed, runs, required=required, dtype=dtype, precision=precision)
