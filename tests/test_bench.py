"""``densenet bench``: a tiny real run through the CLI (one backend, each case in its own
process), the JSON report's schema, failing cases reported as rows, and mode parsing. Never a
timed assertion: the numbers are only checked to be there and positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common import bench
from common.bench import MODES, BenchCase, allocator, parse_modes
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
    assert report["schema"] == 1
    assert report["settings"]["batch_size"] == 2 and report["settings"]["input_size"] == [32, 32]
    assert report["settings"]["config"]["growth_rate"] == 16
    assert report["settings"]["threads"] == 1
    assert {"cpus", "platform", "python"} <= set(report["machine"])
    assert [(r["backend"], r["mode"], r["phase"]) for r in report["rows"]] == [
        ("torch", "eager", "train"),
        ("torch", "eager", "inference"),
    ]
    for row in report["rows"]:
        assert "error" not in row, row
        assert all(row[k] > 0 for k in NUMBERS), row
        assert row["min_s"] <= row["q1_s"] <= row["median_s"] <= row["q3_s"] <= row["max_s"]
        assert row["version"]
        assert row["threads"] == 1  # each case's process inherits the count
        # As densenet train runs PyTorch: on TCMalloc where installed, unless DENSENET_MALLOC says not.
        on_tcmalloc = allocator.find_tcmalloc() and allocator.choice() == "tcmalloc"
        assert row["malloc"] == ("tcmalloc" if on_tcmalloc else "system")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_case_is_a_row_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that fails (here: a mode its adapter refuses) or runs out of time is reported."""
    report = bench.run_bench(["jax"], {"jax": ["eager"]}, PARITY_CASE, phases=["train"], input_size=(32, 32))
    (row,) = report.rows
    assert row["backend"] == "jax" and row["mode"] == "eager" and row["phase"] == "train"
    assert "error" in row and ("always jitted" in row["error"] or "cannot" in row["error"]), row
    assert "FAILED" in report.to_text()

    monkeypatch.setattr(bench, "case_command", lambda case: ["sleep", "30"])
    report = bench.run_bench(["torch"], {"torch": ["eager"]}, PARITY_CASE, phases=["inference"], timeout=1)
    assert report.rows[0]["error"] == "timed out after 1 s"


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
    lines = bench.BenchReport(settings, rows).to_text().splitlines()[3:]
    assert [line.split()[-2:] for line in lines] == [["system,", "NaiveEngine"], ["100", "system"], ["100", "system"]]
