"""The ``densenet`` command and the shape harness behind it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from common.cli import main
from common.config import DenseNetConfig, count_params
from common.harness import compare_shapes, make_input
from common.registry import BACKENDS

TINY = ["--num-channels", "8", "--growth-rate", "4", "--arch", "2,2", "--input-size", "32"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_make_input_is_seeded_and_in_range() -> None:
    config = DenseNetConfig(in_channels=3)
    a = make_input(config, (40, 36), 2, seed=7)
    assert a.shape == (2, 3, 40, 36) and a.dtype == np.float32
    assert np.array_equal(a, make_input(config, (40, 36), 2, seed=7))
    assert not np.array_equal(a, make_input(config, (40, 36), 2, seed=8))
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
    def boom(self, config, seed=0):
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(type(adapter), "build", boom)
    report = compare_shapes([adapter.name], DenseNetConfig(arch=(1, 1)), 32)
    assert not report.ok
    assert report.runs[0].status == "error"
    assert "simulated build failure" in report.failures[0]


def test_required_backend_that_cannot_load_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.registry as registry

    monkeypatch.setitem(registry.BACKENDS, "torch", ("densenet_does_not_exist", "X", "PyTorch", "torch"))
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
