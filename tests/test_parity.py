"""Numerical parity: identical canonical weights and inputs give the same numbers everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import BN_MOMENTUM, DenseNetConfig
from common.parity import ORACLE, align_running_var, bn_counts, run_parity
from common.registry import available

# growth_rate 16: MXNet 1.9.1's oneDNN backward fails on some narrower growth rates (see README).
SMALL = DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2))


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest):
    from tests.conftest import required_backends

    names = [s.name for s in available() if s.available or s.name in required_backends(request.config)]
    return run_parity(names, SMALL, input_size=32, batch=8, steps=10, lr=0.01, seed=3)


def test_every_backend_took_part(report) -> None:
    assert not report.errors, report.errors
    assert report.participants[0] == ORACLE and len(report.participants) >= 2


def test_all_checks_pass(report) -> None:
    failed = [
        f"{c.check} {c.a}/{c.b}: abs {c.max_abs:.2e} rel {c.max_rel:.2e} at {c.worst} ({c.tolerance})"
        for c in report.comparisons
        if not c.passed
    ]
    assert not failed, "\n".join(failed)
    assert report.ok


def test_every_check_is_compared(report) -> None:
    checks = {c.check for c in report.comparisons}
    assert {"inference", "train-forward", "running-stats"} <= checks
    if len(report.participants) > 2:  # gradients and steps need two frameworks
        assert {"grad-input", "grad-params", "grad-conv-bias", "sgd-step", "lockstep"} <= checks


def test_lockstep_losses_really_train(report) -> None:
    for name, losses in report.losses.items():
        assert len(losses) == 10 and all(np.isfinite(losses)), name
        assert len(set(losses)) > 1, f"{name}: the loss never changed"


def test_a_perturbed_weight_is_caught(adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a backend loading one slightly wrong tensor is reported."""
    original = type(adapter).set_weights

    def perturbed(self, model, weights):
        weights = dict(weights)
        weights["dense2.conv1.conv.weight"] = weights["dense2.conv1.conv.weight"] * 1.01
        original(self, model, weights)

    monkeypatch.setattr(type(adapter), "set_weights", perturbed)
    bad = run_parity([adapter.name], SMALL, input_size=32, batch=4, steps=2, lr=0.01)
    failed = {c.check for c in bad.comparisons if not c.passed}
    assert "inference" in failed and not bad.ok


def test_running_variance_alignment_matches_pytorch_convention() -> None:
    """x = 0..7 from running var 1: biased update 1.4625 (momentum 0.1), PyTorch's 1.5."""
    x = np.arange(8, dtype=np.float64)
    biased = (1 - BN_MOMENTUM) * 1.0 + BN_MOMENTUM * x.var()
    aligned = align_running_var(
        {"stem.bn.running_var": np.array([biased])}, {"stem.bn.running_var": np.ones(1)}, {"stem": 8}
    )
    np.testing.assert_allclose(aligned["stem.bn.running_var"], [1.5], rtol=1e-12)


def test_bn_counts_follow_the_plan() -> None:
    counts = bn_counts(DenseNetConfig(), (96, 96), 2)
    assert counts["stem"] == 2 * 48 * 48
    assert counts["dense1.conv4"] == counts["transition1"] == 2 * 24 * 24
    assert counts["head"] == 2 * 3 * 3


def test_naive_defaults_each_cost_something() -> None:
    from common.parity import run_naive

    rows = {(r.default, r.affects): r for r in run_naive(SMALL, input_size=32, batch=4)}
    assert rows[("BN epsilon 1e-3", "inference logits and stages")].max_abs > 1e-3
    assert rows[("'same' padding on the stride-2 stem", "inference logits and stages")].max_abs > 1e-2
    momentum = rows[("momentum 0.99 (0.01 in PyTorch's meaning)", "running statistics after one step")]
    assert momentum.max_abs > 1e-2
    # Fast variance only matters when the mean dwarfs the spread.
    small = rows[("fast variance E[x^2]-E[x]^2, float32, input mean 0.5", "training-mode logits and stages")]
    large = rows[("fast variance E[x^2]-E[x]^2, float32, input mean 100.5", "training-mode logits and stages")]
    assert small.max_abs < large.max_abs


def test_same_padding_is_symmetric_on_odd_sizes() -> None:
    """At 33x33 'same' pads (3, 3) and (1, 1): exactly the explicit padding, so it costs nothing."""
    from common.parity import run_naive

    rows = {(r.default, r.affects): r for r in run_naive(SMALL, input_size=33, batch=2)}
    assert rows[("'same' padding on the stride-2 stem", "inference logits and stages")].max_abs == 0.0


@pytest.mark.torch
def test_parity_cli_naive_json(capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    import json

    from common.cli import main
    from tests.conftest import get_adapter

    get_adapter("torch", request.config)  # skips (or fails, if required) when torch cannot load

    code = main(
        [
            "parity",
            "--backends",
            "torch",
            "--num-channels",
            "16",
            "--growth-rate",
            "16",
            "--arch",
            "2,2",
            "--steps",
            "2",
            "--naive",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"]
    assert {r["frameworks"] for r in report["naive"]} >= {"Keras", "Flax", "TF, Flax (the book)"}
