"""``densenet bench``: speed and memory of every backend in every execution mode.

Each case (backend x mode x phase x precision) runs in its own process (:func:`run_case`, started
by :func:`run_bench`), so its peak resident memory (``ru_maxrss``) is its own and a crash or a hang
costs that case only. Every row has an ``outcome``: ``measured``; ``n/a``, a case the backend does
not offer (its adapter raised :class:`common.errors.Unsupported`: JAX's eager training step, say),
with the reason in ``not_applicable``; or ``failed`` (an exception, a crash, a timeout), with the
reason in ``error``. Only a failure fails the command. A case times its first step apart
(compiling, for every mode but eager), runs the warm-up steps, then times each of ``steps`` steps
on its own; the report gives the median, the quartiles and the extremes, and the load the case ran
under (:mod:`common.bench.load`). Nothing here imports a framework: the child loads its backend
through the registry.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import resources
from common.adapter import PRECISIONS
from common.bench import load
from common.config import DenseNetConfig
from common.errors import BackendError, DenseNetError, Unsupported
from common.process import allocator, lifeline, threads
from common.registry import load_backend
from common.render import format_table
from common.verify.harness import seeded_batches

__all__ = [
    "FAILED",
    "MEASURED",
    "MODES",
    "NOT_APPLICABLE",
    "PHASES",
    "BenchCase",
    "BenchReport",
    "case_command",
    "parse_modes",
    "parse_precisions",
    "precision_ratios",
    "run_bench",
    "run_case",
]

RUNTIME = "onnxruntime"
EXPORTED_FROM = "torch"  # the framework whose ONNX export the onnxruntime rows run

# Every backend's execution modes, by the framework's own names: ``eager`` and each compiled path,
# plus torch's ``nchw``: eager in the book's memory format, where ``eager`` is channels-last, and
# JAX's ``flax-bn``: jit with Flax's own BatchNorm sums, where ``jit`` computes them as products.
# (Kept here as well as in each adapter's ``bench_modes`` so that parsing needs no framework;
# tests/test_bench.py checks that the two agree.)
MODES: dict[str, tuple[str, ...]] = {
    "torch": ("eager", "compile", "nchw"),
    "mxnet": ("eager", "hybridize"),
    "jax": ("eager", "jit", "flax-bn"),
    "tf": ("eager", "function", "xla"),
    # ONNX Runtime, the fifth runtime (docs/deploy.md): PyTorch's ONNX export of the same network,
    # float32 and quantised to int8; inference only.
    RUNTIME: ("onnx", "onnx-int8"),
}
UNCOMPILED = ("eager", "nchw", "onnx", "onnx-int8")
PHASES = ("train", "inference")
# 2: rows have an outcome (n/a apart from failed), a precision and the load they ran under.
SCHEMA = 2
# A row's outcome.
MEASURED, NOT_APPLICABLE, FAILED = "measured", "n/a", "failed"


class BenchError(DenseNetError, ValueError):
    """A benchmark that cannot be set up as asked (an unknown mode or phase)."""


def parse_modes(text: str | None, backends: Sequence[str]) -> dict[str, list[str]]:
    """``--modes``: mode names (``eager``, ``compile``, ``xla``...) or ``compiled`` for every
    non-eager mode, comma-separated; ``None`` or ``all`` for every mode. Each backend gets those
    of its modes that were named; a name no backend has is refused."""
    if text is None or text.strip().lower() == "all":
        return {b: list(MODES[b]) for b in backends}
    names = [v.strip().lower() for v in text.split(",")]
    if any(not v for v in names):
        raise BenchError(f"expected comma-separated modes like eager,compiled, got {text!r} (an empty item)")
    known = {m for modes in MODES.values() for m in modes} | {"compiled"}
    unknown = [v for v in names if v not in known]
    if unknown:
        every = ", ".join(f"{b}: {'/'.join(m)}" for b, m in MODES.items())
        raise BenchError(
            f"unknown mode {', '.join(map(repr, unknown))}; the modes are 'compiled' (every "
            f"non-eager one) or a backend's own ({every})"
        )
    chosen = {b: [m for m in MODES[b] if m in names or (m not in UNCOMPILED and "compiled" in names)] for b in backends}
    if not any(chosen.values()):
        raise BenchError(f"no backend among {', '.join(backends)} has the mode(s) {text!r}")
    return {b: modes for b, modes in chosen.items() if modes}


def parse_precisions(text: str) -> list[str]:
    """``--precision``: ``float32``, ``bfloat16`` (mixed precision) or both, comma-separated, in
    the order given."""
    names = [v.strip().lower() for v in text.split(",")]
    unknown = [v for v in names if v not in PRECISIONS]
    if not text.strip() or unknown:
        raise BenchError(f"expected precisions among {', '.join(PRECISIONS)}, comma-separated, got {text!r}")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class BenchCase:
    """One measurement: a backend, a mode, a phase and a precision, with the shared settings."""

    backend: str
    mode: str
    phase: str
    config: DenseNetConfig
    batch_size: int = 32
    input_size: tuple[int, int] = (96, 96)
    steps: int = 5
    warmup: int = 1
    memory_efficient: bool = False
    precision: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchCase:
        return cls(**{**d, "config": DenseNetConfig.from_dict(d["config"]), "input_size": tuple(d["input_size"])})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_case(case: BenchCase) -> dict[str, Any]:
    """Measure ``case`` in this process (the child's side): build, first step, warm-up, timed
    steps. A case the backend does not offer is ``{"not_applicable": why}``: the adapter raises
    :class:`Unsupported` for it (a mode, a phase in a mode, a precision it has no way to run)."""

    try:
        if case.backend == RUNTIME:
            return _measure_onnxruntime(case)
        return _measure(load_backend(case.backend), case)
    except Unsupported as exc:
        return {"not_applicable": str(exc)}


def _measure(adapter: Any, case: BenchCase) -> dict[str, Any]:
    model = adapter.build(case.config, seed=0, memory_efficient=case.memory_efficient, precision=case.precision)
    ((X, y),) = seeded_batches(case.config, case.input_size, case.batch_size, 1, 0)
    step = adapter.bench_step(model, case.phase, case.mode, X, y)
    return {"version": adapter.version(), **_time(step, case), **allocator.engine_record(case.backend)}


def _measure_onnxruntime(case: BenchCase) -> dict[str, Any]:
    """ONNX Runtime on PyTorch's ONNX export of the network (``case.mode``: ``onnx`` or
    ``onnx-int8``, calibrated on the timed batch itself: the ranges change the values, not the speed)."""
    from common.deploy.runtime import onnx_session, onnxruntime_version

    if case.phase != "inference":
        raise Unsupported("ONNX Runtime serves inference; it has no training step here")
    if case.precision != "float32" or case.memory_efficient:
        raise Unsupported("an ONNX export computes as written: no mixed precision, no memory-efficient training")
    if case.input_size[0] != case.input_size[1]:
        raise Unsupported("the ONNX exports take square images")
    ((X, _),) = seeded_batches(case.config, case.input_size, case.batch_size, 1, 0)
    version = onnxruntime_version()
    with tempfile.TemporaryDirectory(prefix="densenet-bench-") as tmp:
        out = Path(tmp) / "export"
        # Exported in a process of its own, so that this one's peak memory is ONNX Runtime's alone.
        job = {"config": case.config.to_dict(), "mode": case.mode, "out": str(out), "size": case.input_size[0]}
        np.save(Path(tmp) / "calibration.npy", X)  # int8: the ranges change the values, not the speed
        command = [sys.executable, "-c", _EXPORT_CHILD, json.dumps(job), str(Path(tmp) / "calibration.npy")]
        done = lifeline.run(command, os.environ, timeout=600)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise RuntimeError(f"exporting for ONNX Runtime failed: {lines[-1]}")
        manifest = json.loads((out / "densenet-export.json").read_text())
        session = onnx_session(out / manifest["artefact"], threads.current())
        feed = {session.get_inputs()[0].name: X}
        result = _time(lambda: session.run(None, feed), case)
    return {"version": f"{version} ({manifest['exporter']})", **result}


_EXPORT_CHILD = f"""
import json, sys
import numpy as np
from common.config import DenseNetConfig
from common.deploy.export import export
from common.registry import load_backend
from common.weights.canonical import init_canonical
job = json.loads(sys.argv[1])
config = DenseNetConfig.from_dict(job["config"])
calibration = np.load(sys.argv[2]) if job["mode"] == "onnx-int8" else None
export(load_backend({EXPORTED_FROM!r}), config, init_canonical(config, 0), job["mode"], job["out"],
       image_size=job["size"], calibration=calibration)
"""


def _time(step: Callable[[], Any], case: BenchCase) -> dict[str, Any]:
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(max(case.warmup - 1, 0)):  # the first step counts as one warm-up step
        step()
    times = []
    for _ in range(case.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    return {
        "first_step_s": first,
        "median_s": median,
        "q1_s": quartiles[0],
        "q3_s": quartiles[2],
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": case.batch_size / median,
        "rss_before_mb": rss_before / 2**20,
        "peak_mb": _peak_bytes() / 2**20,
        "malloc": allocator.in_use(),
        "threads": threads.current(),  # inherited from the bench (common.process.threads)
    }


def case_command(case: BenchCase) -> list[str]:
    """The child process of one case: ``python -m common bench --child JSON``."""
    return [sys.executable, "-m", "common", "bench", "--child", json.dumps(case.to_dict())]


def case_malloc(case: BenchCase) -> str:
    """The ``malloc`` a case runs on: what ``densenet train`` uses for its backend (PyTorch's:
    TCMalloc unless ``DENSENET_MALLOC=system``), the book's mode and every other framework on
    the system's."""
    # `nchw` is the book's PyTorch code run the book's way, so it keeps the book's malloc too.
    # ONNX Runtime brings its own arena allocator.
    return "system" if case.mode == "nchw" or case.backend == RUNTIME else allocator.wanted(case.backend)


def _child_env(case: BenchCase) -> dict[str, str]:
    # The first step is timed as a cold compile: no JAX or Inductor cache from an earlier process
    # (unless the caller sets these variables itself).
    cold = {"DENSENET_JAX_CACHE": "off", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    env = allocator.child_env(resources.child_env({**cold, **os.environ}), case_malloc(case))
    if case.mode == "eager":  # what `densenet train` runs a memory-efficient MXNet network on
        env = allocator.mxnet_engine_env(env, case.backend, case.memory_efficient)
    return env


def _run_child(case: BenchCase, timeout: float) -> dict[str, Any]:
    """One case in a child process: its JSON result, or an ``error`` saying why there is none. The
    child, in a process group of its own (Ctrl-C reaches the parent, which ends the child itself),
    is killed with anything it started on timeout, on Ctrl-C, SIGTERM or SIGHUP (then re-raised)
    and on any other way out; it dies with this process if this one is killed outright
    (common.process.lifeline)."""
    try:
        done = lifeline.run(case_command(case), _child_env(case), timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "no output"
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode}" + (f" ({reason})" if lines else "")
        return {"error": f"exit {done.returncode}: {reason[:300]}"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"the child printed no result: {done.stdout[-200:]!r}"}


def outcome(row: dict[str, Any]) -> str:
    """A row's outcome, also for a schema-1 row (which had only ``error`` to tell)."""
    if "outcome" in row:
        return row["outcome"]
    return FAILED if "error" in row else NOT_APPLICABLE if "not_applicable" in row else MEASURED


def busy_reasons(row: dict[str, Any]) -> list[str]:
    """Why a case's times are not an idle machine's (empty: they are, as far as ``/proc`` tells).
    Not the load average: it counts the case's own threads."""
    record = row.get("load") or {}
    return load.busy_reasons(None, None, record.get("steal_share"), record.get("others_share"), load_too=False)


def precision_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every backend, mode and phase measured in both float32 and bfloat16: the two median
    step times, ``speed_ratio``, bfloat16's images/s over float32's (above 1: bfloat16 is faster),
    and ``busy``, whether either ran beside other load (then the ratio says little)."""
    measured: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if outcome(r) == MEASURED:
            measured.setdefault((r["backend"], r["mode"], r["phase"]), {})[r.get("precision", "float32")] = r
    return [
        {
            "backend": backend,
            "mode": mode,
            "phase": phase,
            "float32_median_s": m["float32"]["median_s"],
            "bfloat16_median_s": m["bfloat16"]["median_s"],
            "speed_ratio": m["float32"]["median_s"] / m["bfloat16"]["median_s"],
            "busy": bool(busy_reasons(m["float32"]) or busy_reasons(m["bfloat16"])),
        }
        for (backend, mode, phase), m in measured.items()
        if {"float32", "bfloat16"} <= m.keys()
    ]


def _percent(share: float | None) -> str:
    return "?" if share is None else f"{share * 100:.0f}"


@dataclass
class BenchReport:
    """Every case's row, with the settings and the machine they were measured on, the load on the
    machine before the first case and the warnings given about it."""

    settings: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    load_at_start: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if outcome(r) == FAILED]

    @property
    def not_applicable(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if outcome(r) == NOT_APPLICABLE]

    @property
    def measured(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if outcome(r) == MEASURED]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "settings": self.settings,
            "machine": machine(),
            "load_at_start": self.load_at_start,
            "warnings": self.warnings,
            "rows": self.rows,
            "precision_ratios": precision_ratios(self.rows),
        }

    def to_text(self) -> str:
        s = self.settings
        head = (
            f"DenseNet {s['config']['describe']}, batch {s['batch_size']} at {s['input_size'][0]}x"
            f"{s['input_size'][1]}, {s['steps']} timed step(s) after {s['warmup']} warm-up, plain SGD, "
            f"{'memory-efficient' if s['memory_efficient'] else 'standard'} network; each case in its own process"
            + (f", {s['threads']} thread(s)" if "threads" in s else "")
        )
        if "bfloat16" in s.get("precisions", ()):
            head += f"\nCPU support for bfloat16: {load.cpu_bfloat16() or 'unknown (no /proc/cpuinfo)'}"
        headers = [
            *("backend", "mode", "phase", "precision", "median ms", "IQR ms", "min-max ms"),
            *("img/s", "first step s", "peak MiB", "malloc", "others %", "steal %"),
        ]
        body = []
        for r in self.rows:
            cells = [r["backend"], r["mode"], r["phase"], r.get("precision", "float32")]
            shares = [_percent(r.get("load", {}).get(k)) for k in ("others_share", "steal_share")]
            kind = outcome(r)
            if kind == MEASURED:
                cells += [
                    f"{r['median_s'] * 1e3:,.1f}",
                    f"{r['q1_s'] * 1e3:,.1f}-{r['q3_s'] * 1e3:,.1f}",
                    f"{r['min_s'] * 1e3:,.1f}-{r['max_s'] * 1e3:,.1f}",
                    f"{r['images_per_s']:,.1f}",
                    f"{r['first_step_s']:,.2f}",
                    f"{r['peak_mb']:,.0f}",
                    _runtime(r),
                    *shares,
                    "",
                ]
            elif kind == NOT_APPLICABLE:
                cells += ["n/a", *["-"] * 6, *shares, f"n/a: {r['not_applicable']}"]
            else:
                cells += ["-"] * 7 + [*shares, f"FAILED: {r['error']}"]
            body.append(cells)
        if any(row[-1] for row in body):
            headers.append("")
        else:
            body = [row[:-1] for row in body]
        foot = (
            "others %, steal %: the share of the machine's CPU time (all cores) that other processes used,\n"
            "and that the hypervisor took, while the case's process ran (? where /proc/stat is missing);\n"
            "the JSON has them with the 1-minute load average before and after each case."
        )
        text = head + "\n" + format_table(headers, body) + "\n" + foot
        ratios = precision_ratios(self.rows)
        if ratios:
            table = format_table(
                ["backend", "mode", "phase", "float32 ms", "bfloat16 ms", "bfloat16 speed / float32", ""],
                [
                    [
                        q["backend"],
                        q["mode"],
                        q["phase"],
                        f"{q['float32_median_s'] * 1e3:,.1f}",
                        f"{q['bfloat16_median_s'] * 1e3:,.1f}",
                        f"{q['speed_ratio']:.2f}x",
                        "beside other load: not to be trusted" if q["busy"] else "",
                    ]
                    for q in ratios
                ],
            )
            text += "\n\nbfloat16 against float32 (median step times; above 1x, bfloat16 is faster):\n" + table
        return text


def _runtime(row: dict[str, Any]) -> str:
    """The table's ``malloc`` cell: the allocator, and MXNet's engine where it is not the default."""
    engine = row.get("mxnet_engine")
    default = allocator.mxnet_engine({})
    return row.get("malloc", "?") + (f", {engine}" if engine and engine != default else "")


def machine() -> dict[str, Any]:
    """Where the numbers were taken: CPU count, load, platform, Python, what the CPU offers for bfloat16."""
    try:
        averages = list(os.getloadavg())
    except OSError:
        averages = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": averages,
        "bfloat16": load.cpu_bfloat16(),
        "python": platform.python_version(),
    }


def run_bench(
    backends: Sequence[str],
    modes: dict[str, list[str]],
    config: DenseNetConfig,
    *,
    phases: Sequence[str] = PHASES,
    precisions: Sequence[str] = ("float32",),
    batch_size: int = 32,
    input_size: tuple[int, int] = (96, 96),
    steps: int = 5,
    warmup: int = 1,
    memory_efficient: bool = False,
    timeout: float = 600.0,
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    load_sample_s: float = 0.5,
) -> BenchReport:
    """Every case of ``backends`` x their ``modes`` x ``phases`` x ``precisions``, each in its own
    process. The load is sampled for ``load_sample_s`` before the first case; ``warn`` is told,
    one line each, when the machine is busy then and when a case ran beside other load (the
    report keeps the same lines)."""
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise BenchError(f"unknown phase {unknown[0]!r}; expected {' or '.join(PHASES)}")
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise BenchError(f"expected precisions among {', '.join(PRECISIONS)}, got {list(precisions)}")
    for b in backends:
        if b not in MODES:
            raise BackendError(f"unknown backend {b!r}")
    say = progress or (lambda message: None)
    settings = {
        "config": {**config.to_dict(), "describe": config.describe()},
        "batch_size": batch_size,
        "input_size": list(input_size),
        "steps": steps,
        "warmup": warmup,
        "memory_efficient": memory_efficient,
        "precisions": list(precisions),
        "timeout_s": timeout,
        "threads": threads.current(),  # every case inherits it (common.process.threads)
    }
    report = BenchReport(settings)

    def caution(message: str) -> None:
        report.warnings.append(message)
        if warn is not None:
            warn(message)

    cpus = os.cpu_count()
    report.load_at_start = {**load.sample(load_sample_s), "cpus": cpus}
    start = report.load_at_start
    busy = load.busy_reasons(start["load_avg_1min_after"], cpus, start["steal_share"], start["others_share"])
    if busy:
        caution(
            f"the machine is busy before the first case ({'; '.join(busy)}; sampled over {load_sample_s:g} s): "
            "expect slower, noisier times than on an idle machine"
        )
    cases = [
        BenchCase(backend, mode, phase, config, batch_size, input_size, steps, warmup, memory_efficient, precision)
        for backend in backends
        for mode in modes.get(backend, [])
        for phase in phases
        for precision in precisions  # float32 and bfloat16 of one case side by side
    ]
    named = list(precisions) != ["float32"]  # the progress lines name the precision where it is not the default
    for case in cases:
        name = " ".join([case.backend, case.mode, case.phase] + ([case.precision] if named else []))
        say(name)
        window = load.Window()
        result = _run_child(case, timeout)
        kind = FAILED if "error" in result else NOT_APPLICABLE if "not_applicable" in result else MEASURED
        row = {"backend": case.backend, "mode": case.mode, "phase": case.phase, "precision": case.precision}
        row |= {"outcome": kind, **result, "load": window.close()}
        row["wall_s"] = row["load"]["window_s"]
        busy = busy_reasons(row)
        if busy and kind != NOT_APPLICABLE:
            caution(f"{name} ran beside other load ({'; '.join(busy)}): its times are not an idle machine's")
        report.rows.append(row)
    return report
