"""``densenet bench``: a tiny real run through the CLI (one backend, each case in its own
process), the JSON report's schema, failing cases reported as rows, cases a backend does not offer
reported as n/a without failing the run, the load each case ran under (the arithmetic on a made-up
``/proc/stat``), the precisions, and mode parsing. Never a timed assertion: the numbers are only
checked to be there and positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common import bench
from common.bench import MODES, BenchCase, allocator, load, parse_modes, parse_precisions
from common.errors import DenseNetError
from common.process import threads
from common.verify.parity import PARITY_CASE
from tests.helpers import get_adapter, run_cli

TINY = ["--num-channels", "16", "--growth-rate", "16", "--arch", "2,2", "--input-size", "32", "--batch-size", "2"]
NUMBERS = ("first_step_s", "median_s", "q1_s", "q3_s", "min_s", "max_s", "images_per_s", "peak_mb", "rss_before_mb")


@pytest.mark.torch
def test_a_tiny_run_reports_every_case_as_json(
    capsys: pytest.CaptureFixture[str], tmp_path, request, monkeypatch: pytest.MonkeyPatch
) -> None:
    get_adapter("torch", request.config)
    monkeypatch.setenv(threads.ENV, "1")  # as `--threads 1` leaves it, without changing this process's pools
    plot = tmp_path / "bench.png"
    code, out, _ = run_cli(
        capsys, "bench", *TINY, "--steps", "2", "--backends", "torch", "--modes", "eager", "--json", "--plot", plot
    )
    assert code == 0
    report = json.loads(out)
    assert report["schema"] == 2
    assert report["settings"]["batch_size"] == 2 and report["settings"]["input_size"] == [32, 32]
    assert report["settings"]["config"]["growth_rate"] == 16
    assert report["settings"]["threads"] == 1
    assert {"cpus", "platform", "python", "bfloat16"} <= set(report["machine"])
    assert report["settings"]["precisions"] == ["float32"] and report["precision_ratios"] == []
    assert set(LOAD) | {"cpus"} <= set(report["load_at_start"])
    assert [(r["backend"], r["mode"], r["phase"]) for r in report["rows"]] == [
        ("torch", "eager", "train"),
        ("torch", "eager", "inference"),
    ]
    for row in report["rows"]:
        assert "error" not in row, row
        assert row["outcome"] == "measured" and row["precision"] == "float32"
        assert all(row[k] > 0 for k in NUMBERS), row
        _check_load(row["load"])
        assert row["min_s"] <= row["q1_s"] <= row["median_s"] <= row["q3_s"] <= row["max_s"]
        assert row["version"]
        assert row["threads"] == 1  # each case's process inherits the count
        # As densenet train runs PyTorch: on TCMalloc where installed, unless DENSENET_MALLOC says not.
        on_tcmalloc = allocator.find_tcmalloc() and allocator.choice() == "tcmalloc"
        assert row["malloc"] == ("tcmalloc" if on_tcmalloc else "system")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


LOAD = ("load_avg_1min_before", "load_avg_1min_after", "steal_share", "others_share", "own_cpu_s", "window_s")


def _check_load(record: dict) -> None:
    """A load record as a Linux machine gives it: every field, shares between 0 and 1."""
    assert set(LOAD) <= set(record), record
    assert record["window_s"] > 0 and record["own_cpu_s"] >= 0
    if os.path.exists("/proc/stat"):
        assert 0 <= record["steal_share"] <= 1 and 0 <= record["others_share"] <= 1, record
        assert record["load_avg_1min_before"] >= 0 and record["load_avg_1min_after"] >= 0


def _child(result: dict | None = None, status: int = 0, stderr: str = "") -> list[str]:
    """A stand-in for a case's process: prints ``result`` as its JSON line, says ``stderr``,
    exits with ``status``."""
    code = f"import json, sys; print(json.dumps({result!r})); print({stderr!r}, file=sys.stderr); sys.exit({status})"
    return [sys.executable, "-c", code]


TIMING = {"median_s": 0.5, "q1_s": 0.4, "q3_s": 0.6, "min_s": 0.3, "max_s": 0.7, "images_per_s": 4.0}
TIMING |= {"first_step_s": 1.0, "peak_mb": 100.0, "rss_before_mb": 50.0, "version": "0", "malloc": "system"}
CHILDREN = {
    "measured": _child(TIMING),
    "n/a": _child({"not_applicable": "this backend has no such thing"}),
    "failed": _child(None, 1, "boom"),
}


def test_a_failing_case_is_a_row_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that fails (an exception, a crash) or runs out of time is a row saying why."""
    monkeypatch.setattr(bench, "case_command", lambda case: CHILDREN["failed"])
    report = bench.run_bench(["torch"], {"torch": ["eager"]}, PARITY_CASE, phases=["train"], load_sample_s=0.1)
    (row,) = report.rows
    assert row["backend"] == "torch" and row["mode"] == "eager" and row["phase"] == "train"
    assert row["outcome"] == "failed" and row["error"] == "exit 1: boom", row
    assert report.failed == [row] and not report.measured and not report.not_applicable
    _check_load(row["load"])  # a failed case ran under some load too
    assert "FAILED: exit 1: boom" in report.to_text()

    monkeypatch.setattr(bench, "case_command", lambda case: ["sleep", "30"])
    report = bench.run_bench(["torch"], {"torch": ["eager"]}, PARITY_CASE, phases=["inference"], timeout=1)
    assert report.rows[0]["error"] == "timed out after 1 s" and report.rows[0]["outcome"] == "failed"


@pytest.mark.jax
def test_a_case_the_backend_does_not_offer_is_na_and_fails_nothing(
    capsys: pytest.CaptureFixture[str], request, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """JAX's training step is always jitted: its adapter raises Unsupported for the eager one,
    which the bench reports as n/a with the adapter's reason; the run exits 0. (It failed every
    default `densenet bench` before.) The plot names the n/a case with no bar."""
    get_adapter("jax", request.config)
    monkeypatch.setenv(threads.ENV, "1")
    argv = ["--steps", "1", "--backends", "jax", "--modes", "eager", "--json", "--plot", tmp_path / "b.png"]
    code, out, err = run_cli(capsys, "bench", *TINY, *argv)
    assert code == 0, err
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out)
    train, inference = report["rows"]
    assert train["phase"] == "train" and train["outcome"] == "n/a" and "error" not in train, train
    assert "always jitted" in train["not_applicable"]
    assert "median_s" not in train
    _check_load(train["load"])
    assert inference["outcome"] == "measured" and inference["median_s"] > 0
    text = bench.BenchReport(report["settings"], report["rows"]).to_text()
    (line,) = [line for line in text.splitlines() if line.startswith("jax") and " train " in line]
    assert "n/a: JAX's training step is always jitted" in line and "FAILED" not in text


@pytest.mark.parametrize(
    ("outcomes", "status", "said"),
    [
        (("n/a", "measured"), 0, ""),
        (("n/a", "n/a"), 0, "nothing was measured: every case asked for is n/a"),
        (("measured", "failed"), 1, ""),
        (("n/a", "failed"), 1, "no case was measured: 1 failed, 1 n/a (first: exit 1: boom)"),
        (("failed", "failed"), 1, "no case was measured: 2 failed (first: exit 1: boom)"),
    ],
)
def test_only_a_failure_fails_the_run(
    outcomes: tuple[str, str], status: int, said: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """The exit status: 1 when a case failed, whatever else ran; n/a cases fail nothing."""
    children = dict(zip(("train", "inference"), outcomes))
    monkeypatch.setattr(bench, "case_command", lambda case: CHILDREN[children[case.phase]])
    code, out, err = run_cli(capsys, "bench", "--backends", "torch", "--modes", "eager", "--json", "--quiet")
    assert code == status, err
    assert [r["outcome"] for r in json.loads(out)["rows"]] == list(outcomes)
    assert said in err


def test_the_load_arithmetic_on_a_made_up_proc_stat() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice: guest is inside user already.
    before = load.parse_proc_stat("cpu  600 100 200 2500 500 50 50 0 300 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 5\n")
    after = load.parse_proc_stat("cpu  800 100 300 2900 600 50 50 200 400 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert before == load.CpuTimes(busy=1000, idle=3000, steal=0)
    assert after == load.CpuTimes(busy=1300, idle=3500, steal=200) and after.total - before.total == 1000
    # 1,000 ticks went by (10 s of all cores at 100 ticks a second): 200 stolen; 300 busy, of which
    # our own 1.0 s of CPU time is 100: others used 200.
    assert load.shares(before, after, 1.0, 100) == pytest.approx((0.2, 0.2))
    assert load.shares(before, after, 0.0, 100) == pytest.approx((0.2, 0.3))
    # More CPU time of ours than ticks counted busy is rounding between the two clocks: 0, not less.
    assert load.shares(before, after, 5.0, 100) == pytest.approx((0.2, 0.0))
    assert load.shares(before, before, 0.0, 100) == (None, None)  # no time went by
    assert load.shares(None, after, 0.0, 100) == (None, None)
    assert load.shares(before, after, 0.0, None) == (None, None)
    # A kernel without the steal column (before 2.6.11), and text with no cpu line to read.
    assert load.parse_proc_stat("cpu 1 2 3 4 5\n") == load.CpuTimes(busy=6, idle=9, steal=0)
    for text in ("", "intr 1 2 3\n", "cpu 1 2 x 4 5 6 7 8\n", "cpu 1 2 3\n"):
        assert load.parse_proc_stat(text) is None, text
    assert load.read_cpu_times("/nonexistent/stat") is None


def test_what_counts_as_busy() -> None:
    assert load.busy_reasons(0.9, 2, 0.0, 0.05) == []  # 0.45 a core, others 5%: quiet enough
    assert load.busy_reasons(1.2, 2, 0.0, 0.0) == ["1-minute load average 1.20 on 2 cores"]
    assert load.busy_reasons(1.2, 2, 0.0, 0.0, load_too=False) == []
    assert load.busy_reasons(None, 2, 0.08, 0.5) == [
        "other processes used 50% of the CPU time",
        "the hypervisor took 8% of the CPU time (steal)",
    ]
    assert load.busy_reasons(None, None, None, None) == []  # no /proc: nothing to say


def test_a_busy_machine_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first case and for each case that ran beside other load, one line each."""
    busy = {"load_avg_1min_before": 3.0, "load_avg_1min_after": 3.0, "steal_share": 0.0, "others_share": 0.5}
    busy |= {"own_cpu_s": 0.0, "window_s": 0.5}
    monkeypatch.setattr(load.Window, "close", lambda self: dict(busy))
    monkeypatch.setattr(bench, "case_command", lambda case: CHILDREN["n/a" if case.phase == "train" else "measured"])
    said: list[str] = []
    report = bench.run_bench(["torch"], {"torch": ["eager"]}, PARITY_CASE, warn=said.append, load_sample_s=0)
    assert said == report.warnings and len(said) == 2, said
    assert said[0].startswith("the machine is busy before the first case (1-minute load average 3.00 on")
    assert "other processes used 50% of the CPU time" in said[0]
    # The n/a case timed nothing, so it is not warned about; the measured one is.
    assert said[1].startswith("torch eager inference ran beside other load (other processes used 50%")
    assert report.to_dict()["warnings"] == said


@pytest.mark.parametrize(
    ("flags", "offers"),
    [
        ("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", "AMX (amx_bf16)"),
        ("fpu sse avx512f avx512_bf16", "AVX512-BF16"),
        ("fpu sse avx2", "neither: bfloat16 is emulated"),
    ],
)
def test_what_the_cpu_offers_for_bfloat16(flags: str, offers: str) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert load.bfloat16_support(cpuinfo) == offers
    assert load.bfloat16_support("processor : 0\nFeatures : fp asimd bf16\n") == "Arm BF16 (bf16)"


def test_precisions_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_precisions("float32") == ["float32"]
    assert parse_precisions(" bfloat16 , float32,bfloat16") == ["bfloat16", "float32"]
    for bad in ("", "float16", "float32,"):
        with pytest.raises(DenseNetError, match="expected precisions among float32, bfloat16"):
            parse_precisions(bad)
    code, _, err = run_cli(capsys, "bench", "--precision", "fp16")
    assert code == 2 and "expected precisions among float32, bfloat16" in err
    settings = {
        "config": {"describe": "tiny"},
        **{"batch_size": 4, "input_size": [32, 32], "steps": 1, "warmup": 1, "memory_efficient": False},
        "precisions": ["float32", "bfloat16"],
    }
    case = {"backend": "torch", "mode": "eager", "outcome": "measured"}
    rows = [
        {**case, "phase": "train", "precision": "float32", **TIMING, "median_s": 0.5},
        {**case, "phase": "train", "precision": "bfloat16", **TIMING, "median_s": 0.25},
        {**case, "phase": "inference", "precision": "float32", **TIMING},
        {**case, "phase": "inference", "precision": "bfloat16", "outcome": "n/a", "not_applicable": "no bf16 here"},
        {**case, "mode": "nchw", "phase": "train", "precision": "float32", **TIMING},
        {**case, "mode": "nchw", "phase": "train", "precision": "bfloat16", **TIMING, "load": {"others_share": 0.4}},
    ]
    report = bench.BenchReport(settings, rows)
    # Only where both were measured; bfloat16 twice as fast is a ratio of 2. A pair of which one
    # case ran beside other load is marked: its ratio measures the other load as much as bfloat16.
    same = {"float32_median_s": 0.5, "bfloat16_median_s": 0.5, "speed_ratio": 1.0}
    assert report.to_dict()["precision_ratios"] == [
        {
            **{"backend": "torch", "mode": "eager", "phase": "train"},
            **{"float32_median_s": 0.5, "bfloat16_median_s": 0.25, "speed_ratio": 2.0, "busy": False},
        },
        {"backend": "torch", "mode": "nchw", "phase": "train", **same, "busy": True},
    ]
    text = report.to_text()
    assert "\nCPU support for bfloat16: " in text
    eager, nchw = text.splitlines()[-2:]
    assert eager.split() == ["torch", "eager", "train", "500.0", "250.0", "2.00x"]
    assert nchw.split()[5] == "1.00x" and nchw.endswith("  beside other load: not to be trusted")
    assert "n/a: no bf16 here" in text


@pytest.mark.torch
def test_both_precisions_side_by_side(capsys: pytest.CaptureFixture[str], request, monkeypatch) -> None:
    """``--precision float32,bfloat16``: each case in both, next to each other, and their ratio."""
    get_adapter("torch", request.config)
    monkeypatch.setenv(threads.ENV, "1")
    argv = ["--steps", "1", "--backends", "torch", "--modes", "eager", "--phases", "inference"]
    code, out, err = run_cli(capsys, "bench", *TINY, *argv, "--precision", "float32,bfloat16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["settings"]["precisions"] == ["float32", "bfloat16"]
    measured = [("float32", "measured"), ("bfloat16", "measured")]
    assert [(r["precision"], r["outcome"]) for r in report["rows"]] == measured
    (ratio,) = report["precision_ratios"]
    assert ratio["speed_ratio"] == pytest.approx(ratio["float32_median_s"] / ratio["bfloat16_median_s"])
    assert report["machine"]["bfloat16"] in ("AMX (amx_bf16)", "AVX512-BF16", "neither: bfloat16 is emulated")


@pytest.mark.mxnet
def test_a_precision_the_backend_refuses_is_na(capsys: pytest.CaptureFixture[str], request) -> None:
    """MXNet's adapter raises Unsupported for its memory-efficient network in bfloat16 (AMP breaks
    the recomputation's backward pass): that case is n/a with the adapter's reason, not a failure."""
    get_adapter("mxnet", request.config)
    argv = ["--steps", "1", "--backends", "mxnet", "--modes", "eager", "--phases", "train", "--memory-efficient"]
    code, out, err = run_cli(capsys, "bench", *TINY, *argv, "--precision", "bfloat16", "--json")
    assert code == 0, err
    (row,) = json.loads(out)["rows"]
    assert row["precision"] == "bfloat16" and row["outcome"] == "n/a" and "bfloat16" in row["not_applicable"], row
    assert "nothing was measured" in err


def test_mode_names() -> None:
    assert parse_modes(None, ["torch", "tf"]) == {
        "torch": ["eager", "compile", "nchw"],
        "tf": ["eager", "function", "xla"],
    }
    assert parse_modes("compiled", ["mxnet", "jax", "torch"]) == {
        "mxnet": ["hybridize"],
        "jax": ["jit", "flax-bn"],
        "torch": ["compile"],  # nchw is eager too
    }
    assert parse_modes("eager,xla", ["torch", "tf"]) == {"torch": ["eager"], "tf": ["eager", "xla"]}
    assert parse_modes("xla", ["torch", "tf"]) == {"tf": ["xla"]}
    with pytest.raises(DenseNetError, match="unknown mode 'fast'"):
        parse_modes("fast", ["torch"])
    with pytest.raises(DenseNetError, match="no backend among torch"):
        parse_modes("xla", ["torch"])


def test_every_adapter_names_the_modes_the_bench_knows(adapter) -> None:
    assert adapter.bench_modes == MODES[adapter.name]


def test_a_case_survives_the_trip_to_the_child() -> None:
    case = BenchCase("tf", "xla", "train", PARITY_CASE, 4, (32, 48), 3, 2, True)
    assert BenchCase.from_dict(json.loads(json.dumps(case.to_dict()))) == case


_COMPILE_TINY = """
import jax, numpy as np
from common.config import DenseNetConfig
from common.registry import load_backend
a = load_backend("jax")
m = a.build(DenseNetConfig(num_channels=8, growth_rate=8, arch=(1, 1)))
a.train_step(m, np.zeros((2, 1, 16, 16), np.float32), np.zeros(2, np.int64), 0.1, compiled=True)
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.jax
@pytest.mark.parametrize("setting", ["dir", "off"])
def test_jax_keeps_compiled_programs_where_told(setting: str, tmp_path, request) -> None:
    """``DENSENET_JAX_CACHE``: a directory the compiled programs go to, or ``off``; the bench's
    children run without it, so their first step is a cold compile."""
    get_adapter("jax", request.config)
    cache = tmp_path / "cache"
    value = str(cache) if setting == "dir" else "off"
    env = {**os.environ, "DENSENET_JAX_CACHE": value, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_TINY], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    if setting == "dir":
        assert done.stdout.split()[-1] == str(cache)
        assert any(p.name.startswith("jit__sgd_step") for p in cache.iterdir())
    else:
        assert done.stdout.split()[-1] == "None" and not cache.exists()
    case = BenchCase("jax", "jit", "train", PARITY_CASE)
    assert bench._child_env(case)["DENSENET_JAX_CACHE"] == os.environ.get("DENSENET_JAX_CACHE", "off")


def test_the_table_names_mxnets_engine_where_it_is_not_the_default() -> None:
    settings = {
        "config": {"describe": "tiny"},
        **{"batch_size": 4, "input_size": [32, 32], "steps": 1, "warmup": 1, "memory_efficient": True},
    }
    timing = {"median_s": 1.0, "q1_s": 1.0, "q3_s": 1.0, "min_s": 1.0, "max_s": 1.0, "images_per_s": 4.0}
    timing |= {"first_step_s": 1.0, "peak_mb": 100.0, "malloc": "system"}
    timing |= {"phase": "train"}
    rows = [
        {"backend": "mxnet", "mode": "eager", **timing, "mxnet_engine": "NaiveEngine"},
        {"backend": "mxnet", "mode": "hybridize", **timing, "mxnet_engine": allocator.mxnet_engine({})},
        {"backend": "tf", "mode": "eager", **timing},
    ]
    text = bench.BenchReport(settings, rows).to_text().splitlines()
    header, lines = text[1], text[3:6]
    assert text[6].startswith("others %, steal %:")
    start, end = header.index("malloc"), header.index("others %")
    assert [line[start:end].strip() for line in lines] == ["system, NaiveEngine", "system", "system"]


@pytest.mark.torch
def test_onnxruntime_runs_pytorchs_export_float32_and_int8(capsys: pytest.CaptureFixture[str], request) -> None:
    """The fifth runtime: ONNX Runtime on PyTorch's ONNX export, float32 and int8; inference only,
    training is n/a with why."""
    if not request.config.getoption("--backends"):  # with required backends (CI) a missing one fails
        pytest.importorskip("onnxruntime")
    get_adapter("torch", request.config)
    argv = ["--steps", "2", "--backends", "onnxruntime", "--json"]
    code, out, err = run_cli(capsys, "bench", *TINY, *argv)
    assert code == 0, err
    rows = {(r["mode"], r["phase"]): r for r in json.loads(out)["rows"]}
    assert set(rows) == {(m, p) for m in ("onnx", "onnx-int8") for p in ("train", "inference")}
    for mode in ("onnx", "onnx-int8"):
        assert rows[mode, "train"]["outcome"] == "n/a" and "inference" in rows[mode, "train"]["not_applicable"]
        row = rows[mode, "inference"]
        assert row["outcome"] == "measured" and row["images_per_s"] > 0, row
        assert "torch.onnx.export" in row["version"] and row["malloc"] == "system"
