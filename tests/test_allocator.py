"""Which ``malloc`` PyTorch runs on (``common.process.allocator``): ``densenet train --backend torch``
started as a program runs on TCMalloc where it is installed, ``DENSENET_MALLOC=system`` keeps
glibc's, a bad value is refused, and the bench starts each case on the allocator its mode names.
And which engine MXNet runs on: a memory-efficient network trains eagerly on the NaiveEngine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.bench import BenchCase, _child_env, allocator, case_malloc
from common.verify.parity import PARITY_CASE
from tests.helpers import get_adapter
from tests.test_data import make_dataset

ROOT = Path(__file__).resolve().parents[1]
TCMALLOC = allocator.find_tcmalloc()
# CI installs TCMalloc (.ci/setup): there, its absence is a failure, not a reason to skip.
if TCMALLOC is None and os.environ.get("CI"):
    pytest.fail("TCMalloc is not installed (apt-get install libtcmalloc-minimal4)", pytrace=False)


def _env(**changes: str) -> dict[str, str]:
    ours = ("LD_PRELOAD", allocator.ENV, "DENSENET_MALLOC_RELAUNCHED", allocator.MXNET_ENGINE)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**env, **changes}


def _train(tmp_path: Path, name: str, *extra: str, backend: str = "torch", **env: str) -> subprocess.CompletedProcess:
    data = tmp_path / "fmnist"
    if not data.exists():
        make_dataset(data, n_train=64, n_test=32)
    argv = ["train", "--backend", backend, "--epochs", "1", "--batch-size", "32", "--resize", "32", "--quiet"]
    argv += ["--num-channels", "8", "--growth-rate", "8", "--arch", "1,1", "--data-dir", str(data)]
    return subprocess.run(
        [sys.executable, "-m", "common", *argv, *extra, "--out", str(tmp_path / name)],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.torch
def test_pytorch_training_runs_on_tcmalloc_unless_told_otherwise(tmp_path: Path, request) -> None:
    get_adapter("torch", request.config)
    done = _train(tmp_path, "default")
    assert done.returncode == 0, done.stderr
    expected = "tcmalloc" if TCMALLOC else "system"
    assert json.loads((tmp_path / "default" / "run.json").read_text())["malloc"] == expected
    done = _train(tmp_path, "alias", backend="pytorch")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "alias" / "run.json").read_text())["malloc"] == expected
    done = _train(tmp_path, "system", DENSENET_MALLOC="system")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "system" / "run.json").read_text())["malloc"] == "system"
    # Distributed runs stay on the system's: a gloo worker on TCMalloc sometimes aborted at exit
    # ("terminate called without an active exception"). Worker 0 writes run.json.
    done = _train(tmp_path, "workers", "--workers", "2", DENSENET_DIST_TIMEOUT="120")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "workers" / "run.json").read_text())["malloc"] == "system"


def test_an_unknown_allocator_is_refused_with_the_choices(tmp_path: Path) -> None:
    done = _train(tmp_path, "bad", DENSENET_MALLOC="jemalloc")
    assert done.returncode == 2
    assert "DENSENET_MALLOC='jemalloc': expected one of tcmalloc, system" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "bad").exists()


@pytest.mark.skipif(TCMALLOC is None, reason="TCMalloc is not installed")
def test_relaunching_loads_tcmalloc_once() -> None:
    """The relaunched process has TCMalloc mapped and does not start again; a distributed worker,
    a process already relaunched, or one told to keep the system's never starts again."""
    code = "from common.process import allocator; print(allocator.in_use())"
    relaunch = f"from common.process import allocator; allocator.relaunch_on_tcmalloc(['-c', {code!r}]); print('kept')"
    done = subprocess.run([sys.executable, "-c", relaunch], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tcmalloc"]
    # Already marked as relaunched (or asked for the system's): the process carries on as it is.
    for env in ({"DENSENET_MALLOC_RELAUNCHED": "1"}, {allocator.ENV: "system"}, {"DENSENET_DIST_WORKER": "1"}):
        done = subprocess.run([sys.executable, "-c", relaunch], env=_env(**env), capture_output=True, text=True)
        assert done.stdout.split() == ["kept"], done.stderr


def test_child_environments() -> None:
    base = {"LD_PRELOAD": "/opt/libother.so /usr/lib/libtcmalloc.so.4", "X": "1"}
    system = allocator.child_env(base, "system")
    assert system == {"LD_PRELOAD": "/opt/libother.so", "X": "1"}
    assert "LD_PRELOAD" not in allocator.child_env({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "system")
    wanted = allocator.child_env(base, "tcmalloc")
    if TCMALLOC:
        assert wanted["LD_PRELOAD"] == f"{TCMALLOC} /opt/libother.so"
    else:
        assert wanted["LD_PRELOAD"] == "/opt/libother.so"
    assert base["LD_PRELOAD"] == "/opt/libother.so /usr/lib/libtcmalloc.so.4"  # not modified


def test_the_bench_runs_the_books_mode_on_the_systems_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    def case(backend: str, mode: str) -> BenchCase:
        return BenchCase(backend, mode, "train", PARITY_CASE)

    monkeypatch.delenv(allocator.ENV, raising=False)
    assert [case_malloc(case("torch", m)) for m in ("eager", "compile", "nchw")] == ["tcmalloc", "tcmalloc", "system"]
    assert {case_malloc(case(b, "eager")) for b in ("mxnet", "jax", "tf")} == {"system"}
    monkeypatch.setenv(allocator.ENV, "system")
    assert case_malloc(case("torch", "eager")) == "system"


def test_a_memory_efficient_mxnet_network_trains_on_the_synchronous_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def case(mode: str, memory_efficient: bool, backend: str = "mxnet") -> BenchCase:
        return BenchCase(backend, mode, "train", PARITY_CASE, memory_efficient=memory_efficient)

    monkeypatch.delenv(allocator.MXNET_ENGINE, raising=False)
    engine = allocator.MXNET_ENGINE
    assert allocator.mxnet_engine_env({"X": "1"}, "mxnet", memory_efficient=True) == {"X": "1", engine: "NaiveEngine"}
    assert allocator.mxnet_engine_env({"X": "1"}, "mxnet", memory_efficient=False) == {"X": "1"}
    # An engine the user chose is kept.
    assert allocator.mxnet_engine_env({engine: "ThreadedEngine"}, "mxnet", True) == {engine: "ThreadedEngine"}
    assert allocator.mxnet_engine({}) == "ThreadedEnginePerDevice"
    # The bench's eager case is what `densenet train` runs; the hybridized one keeps MXNet's default.
    assert _child_env(case("eager", True))[engine] == "NaiveEngine"
    for other in (case("eager", False), case("hybridize", True), case("eager", True, backend="tf")):
        assert engine not in _child_env(other)


@pytest.mark.mxnet
def test_memory_efficient_mxnet_training_runs_eagerly_on_the_naive_engine(tmp_path: Path, request) -> None:
    adapter = get_adapter("mxnet", request.config)
    efficient = adapter.build(PARITY_CASE, memory_efficient=True)
    assert not adapter.trains_compiled(efficient) and adapter.trains_compiled(adapter.build(PARITY_CASE))
    runs = {"efficient": ("--memory-efficient",), "standard": ()}
    for name, extra in runs.items():
        done = _train(tmp_path, name, *extra, backend="mxnet")
        assert done.returncode == 0, done.stderr
    engines = {name: json.loads((tmp_path / name / "run.json").read_text())["mxnet_engine"] for name in runs}
    assert engines == {"efficient": "NaiveEngine", "standard": "ThreadedEnginePerDevice"}
    done = _train(tmp_path, "chosen", "--memory-efficient", backend="mxnet", MXNET_ENGINE_TYPE="ThreadedEngine")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "chosen" / "run.json").read_text())["mxnet_engine"] == "ThreadedEngine"
    # Named by its alias, the backend is the same one.
    done = _train(tmp_path, "alias", "--memory-efficient", backend="gluon")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "alias" / "run.json").read_text())["mxnet_engine"] == "NaiveEngine"
    # The same gradients, running statistics and steps as the standard network on that engine too:
    # the memory-efficient tests, rerun on it.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "mxnet"]
        + [str(ROOT / "tests" / "test_memory_efficient.py"), "--backends", "mxnet"],
        env=_env(MXNET_ENGINE_TYPE="NaiveEngine"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and " passed" in done.stdout and "failed" not in done.stdout, done.stdout[-3000:]
