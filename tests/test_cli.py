"""The ``densenet`` command and the shape harness behind it."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import common.cli
from common.arch import count_params
from common.cli import main
from common.config import DenseNetConfig
from common.registry import BACKENDS, BackendEntry
from common.verify.harness import compare_shapes, seeded_batches
from common.verify.summary import summarize

TINY = ["--num-channels", "8", "--growth-rate", "4", "--arch", "2,2", "--input-size", "32"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_seeded_batches_are_seeded_and_in_range() -> None:
    config = DenseNetConfig(in_channels=3, num_classes=5)
    (a, y), (b, _) = seeded_batches(config, (40, 36), 2, count=2, seed=7)
    assert a.shape == (2, 3, 40, 36) and a.dtype == np.float32
    assert y.shape == (2,) and y.dtype == np.int64 and 0 <= y.min() and y.max() < 5
    assert np.array_equal(a, seeded_batches(config, (40, 36), 2, seed=7)[0][0])
    assert not np.array_equal(a, seeded_batches(config, (40, 36), 2, seed=8)[0][0])
    assert not np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() < 1.0


def test_harness_agrees_with_plan(adapter) -> None:
    config = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 3), num_classes=5, in_channels=2)
    report = compare_shapes([adapter.name], config, (33, 40), batch=3, seed=1)
    assert report.ok, report.failures
    (run,) = report.runs
    assert run.stages == report.plan.shapes(3)
    assert run.num_params == report.plan.num_params


def test_harness_reports_disagreement(adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend whose stage shape differs from the plan makes the report fail, naming the stage."""
    config = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
    original = type(adapter).stages

    def wrong(self, model, X, training=False):
        out = original(self, model, X, training=training)
        out["dense2"] = out["dense2"][:, :-1]
        return out

    monkeypatch.setattr(type(adapter), "stages", wrong)
    report = compare_shapes([adapter.name], config, 32)
    assert not report.ok
    assert any(f.startswith("stage dense2") for f in report.failures)


def test_harness_reports_backend_errors(adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, config, seed=0, dtype="float32", **kwargs):
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(type(adapter), "build", boom)
    report = compare_shapes([adapter.name], DenseNetConfig(arch=(1, 1)), 32)
    assert not report.ok
    assert report.runs[0].status == "error"
    assert "simulated build failure" in report.failures[0]


def test_required_backend_that_cannot_load_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.registry as registry

    monkeypatch.setitem(registry.BACKENDS, "torch", BackendEntry("densenet_does_not_exist", "X", "PyTorch", "torch"))
    monkeypatch.delitem(registry._loaded, "torch", raising=False)
    report = compare_shapes(["torch"], DenseNetConfig(arch=(1, 1)), 32)
    assert not report.ok
    assert "torch was requested but cannot load" in report.failures[0]
    # Not named explicitly: reported as unavailable, and not a failure by itself.
    assert report.runs[0].status == "unavailable"


def test_compare_table(backend_name: str, adapter, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "compare", "--backends", backend_name, *TINY, "--batch-size", "2")
    assert code == 0, err
    assert "OK: 1 backend(s) agree" in out
    assert "dense2" in out and "(2, 16, 4, 4)" in out
    assert backend_name in out


def test_compare_json(backend_name: str, adapter, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "compare", "--backends", backend_name, *TINY, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["failures"] == []
    assert [s["stage"] for s in report["stages"]] == ["stem", "dense1", "transition1", "dense2", "head"]
    assert all(s["agree"] for s in report["stages"])
    assert report["stages"][1]["shapes"][backend_name] == [1, 16, 8, 8]
    (run,) = report["backends"]
    assert run["name"] == backend_name and run["status"] == "ok"
    assert run["num_params"] == report["expected_params"]


def test_compare_too_small_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "compare", "--input-size", "28")
    assert code == 2
    assert "28x28 is too small" in err and "29x29" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--growth-rate", "0"], "growth_rate must be a positive int"),
        (["--growth-rate", "-3"], "growth_rate must be a positive int"),
        (["--arch", ""], "arch must name at least one dense block"),
        (["--num-classes", "0"], "num_classes must be a positive int"),
    ],
)
def test_compare_bad_config_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, "compare", *argv)
    assert code == 2
    assert message in err


def test_unknown_backend_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "compare", "--backends", "caffe")
    assert code == 2
    assert "unknown backend 'caffe'" in err and "torch" in err
    code, _, err = run_cli(capsys, "summary", "--backend", "caffe")
    assert code == 2 and "unknown backend" in err


@pytest.mark.parametrize("argv", [["compare", "--batch-size", "0"], ["compare", "--input-size", "big"]])
def test_bad_option_values_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list(BACKENDS)
    for r in rows:
        assert r["available"] == (r["reason"] is None)


def test_summary(backend_name: str, adapter, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "summary", "--backend", backend_name, *TINY)
    assert code == 0
    expected = "(1, 16, 8, 8)" if adapter.layout == "NCHW" else "(1, 8, 8, 16)"
    assert expected in out
    tiny = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
    assert f"total trainable parameters: {count_params(tiny):,}" in out


def test_python_dash_m_common() -> None:
    """``python -m common`` is the same command; runs in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "common", "compare", "--input-size", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "too small" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_summary_report(backend_name: str, adapter) -> None:
    """``densenet summary`` prints a report that also serialises, stage by stage."""
    config = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
    report = summarize(backend_name, config, 32, batch=2)
    data = json.loads(json.dumps(report.to_dict()))
    assert [s["stage"] for s in data["stages"]] == ["stem", "dense1", "transition1", "dense2", "head"]
    assert data["num_params"] == count_params(config) == sum(s["params"] for s in data["stages"])
    assert data["stages"][-1]["output_shape"] == [2, 10]
    assert report.to_text().splitlines()[0] == f"{adapter.framework} {adapter.version()}: DenseNet {config.describe()}"


# ------------------------------------------------------------------------------------------------
# The CLI package: no framework, no import cycle, no import hidden in a function

ROOT = Path(common.cli.__file__).parents[2]  # so a fresh process imports this checkout's packages
CLI_MODULES = sorted(
    "common.cli" if p.stem == "__init__" else f"common.cli.{p.stem}"
    for p in (ROOT / "common" / "cli").glob("*.py")
    if p.stem != "__main__"  # running it is the command itself
)
FRAMEWORKS = ("torch", "mxnet", "jax", "flax", "tensorflow", "keras", "optax")


def test_cli_modules_are_found() -> None:
    assert {"common.cli", "common.cli.options", "common.cli.inspection", "common.cli.weights"} <= set(CLI_MODULES)


@pytest.mark.parametrize("module", CLI_MODULES)
def test_cli_module_imports_first_without_a_framework(module: str) -> None:
    """Each CLI module imports on its own in a fresh process, so nothing in the package relies on
    another module having been imported first (an import cycle fails this way), and loads no
    framework: backends load only when a command asks for one."""
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        f"print(','.join(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing {module} loaded {proc.stdout.strip()}"


@pytest.mark.parametrize("module", CLI_MODULES)
def test_cli_module_imports_only_at_the_top(module: str) -> None:
    """Imports inside functions are how cycles get hidden: the CLI has none."""
    path = Path(importlib.import_module(module).__file__)
    tree = ast.parse(path.read_text())
    nested = [
        f"{path.name}:{node.lineno}"
        for func in ast.walk(tree)
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(func)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    assert nested == []


def test_python_dash_m_common_cli() -> None:
    argv = [sys.executable, "-m", "common.cli", "--help"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: densenet ")
