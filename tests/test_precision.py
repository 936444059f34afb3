"""Mixed precision (``precision="bfloat16"``, docs/precision.md): each framework's own mechanism,
float32 weights, statistics and optimiser state, and results within the bfloat16 error model of
the float64 oracle.

MXNet's AMP takes its whole process for good, so every MXNet bfloat16 case runs in a child
process; the other frameworks' run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.adapter import check_precision
from common.errors import Unsupported
from common.verify.parity import ERROR_MODEL, ERROR_MODEL_BF16, PARITY_CASE, UNIT_ROUNDOFF, bound, sweep_environment
from tests.helpers import images, participating_backends, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _in_process(backend_name: str) -> None:
    if backend_name == "mxnet":
        pytest.skip("MXNet's AMP takes its process for good: test_mxnet_in_a_child_process covers it")


def _pair(adapter):
    """A float32 and a bfloat16 network with the same weights."""
    full = adapter.build(PARITY_CASE, seed=0)
    mixed = adapter.build(PARITY_CASE, seed=0, precision="bfloat16")
    adapter.set_weights(mixed, adapter.get_weights(full))
    return full, mixed


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_precision_is_checked() -> None:
    assert check_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16"):
        check_precision("float16")
    with pytest.raises(ValueError, match="keeps float32 weights; it cannot go with dtype float64"):
        check_precision("bfloat16", "float64")


def test_the_bfloat16_error_model_is_looser_than_float32s() -> None:
    """Every check has a bfloat16 constant, and its bound is above float32's: u grows 2**16 times."""
    assert set(ERROR_MODEL_BF16) == set(ERROR_MODEL)
    assert UNIT_ROUNDOFF["bfloat16"] == 2.0**-8
    for check in ERROR_MODEL:
        assert bound(check, "bfloat16") == ERROR_MODEL_BF16[check] * 2.0**-8 > bound(check, "float32")


def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_weights(adapter, backend_name: str) -> None:
    """The logits move by bfloat16's rounding (far more than float32's, so bfloat16 really ran),
    stay inside its bound, and weights, gradients, statistics and velocities stay float32."""
    _in_process(backend_name)
    rng = np.random.default_rng(0)
    X, y = images(rng, (4, 1, 32, 32)), rng.integers(0, 10, 4)
    full, mixed = _pair(adapter)
    assert mixed.precision == "bfloat16" and full.precision == "float32"
    for compiled in (False, True):
        reference = adapter.forward(full, X, compiled=compiled)
        logits = adapter.forward(mixed, X, compiled=compiled)
        assert logits.dtype == np.float32
        error = _relative(logits, reference)
        assert 100 * bound("inference", "float32") < error <= bound("inference", "bfloat16", pairwise=True), error
    loss, dX, grads = adapter.loss_and_grads(mixed, X, y)
    assert np.isfinite(loss) and dX.dtype == np.float32 and {g.dtype for g in grads.values()} == {np.dtype("float32")}
    from common.training.optim import SGD

    adapter.configure_optimizer(mixed, SGD(momentum=0.9))
    before = adapter.get_weights(mixed)
    for compiled in (False, True):
        adapter.train_step(mixed, X, y, 0.1, compiled=compiled)
    after = adapter.get_weights(mixed)
    assert {v.dtype for v in after.values()} == {np.dtype("float32")}
    assert all(np.all(np.isfinite(v)) for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert {v.dtype for v in adapter.get_optimizer_state(mixed).values()} == {np.dtype("float32")}
    stages = adapter.stages(mixed, X)
    assert {v.dtype for v in stages.values()} == {np.dtype("float32")}


def test_the_memory_efficient_network_in_bfloat16(adapter, backend_name: str) -> None:
    """Recomputation and mixed precision together: the same gradients as the standard mixed
    network, or (MXNet) a clear refusal."""
    if backend_name == "mxnet":
        with pytest.raises(Unsupported, match="memory-efficient network in bfloat16"):
            adapter.build(PARITY_CASE, precision="bfloat16", memory_efficient=True)
        return
    rng = np.random.default_rng(1)
    X, y = images(rng, (4, 1, 32, 32)), rng.integers(0, 10, 4)
    _, mixed = _pair(adapter)
    efficient = adapter.build(PARITY_CASE, seed=0, precision="bfloat16", memory_efficient=True)
    adapter.set_weights(efficient, adapter.get_weights(mixed))
    loss_m, dX_m, grads_m = adapter.loss_and_grads(mixed, X, y)
    loss_e, dX_e, grads_e = adapter.loss_and_grads(efficient, X, y)
    assert abs(loss_e - loss_m) <= bound("train-forward", "bfloat16") * abs(loss_m)
    # Both round in bfloat16; the recomputation may round its own way (a fused kernel, another order).
    assert _relative(dX_e, dX_m) <= bound("grad-input", "bfloat16", pairwise=True)


def _child(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.mxnet
def test_mxnet_in_a_child_process(request: pytest.FixtureRequest) -> None:
    """MXNet's AMP: a bfloat16 network computes in bfloat16 with float32 weights; once AMP is on, a
    float32 network is refused instead of silently computing in bfloat16."""
    if "mxnet" not in participating_backends(request.config):
        pytest.skip("MXNet is not installed")
    code = """
import numpy as np
from common.errors import Unsupported
from common.registry import load_backend
from common.verify.parity import PARITY_CASE
a = load_backend("mxnet")
rng = np.random.default_rng(0)
X, y = rng.standard_normal((4, 1, 32, 32)).astype(np.float32), rng.integers(0, 10, 4)
full = a.build(PARITY_CASE, seed=0)
reference = a.forward(full, X)
mixed = a.build(PARITY_CASE, seed=0, precision="bfloat16")
a.set_weights(mixed, a.get_weights(full))
out = {"error": float(np.max(np.abs(a.forward(mixed, X) - reference)) / np.max(np.abs(reference)))}
a.train_step(mixed, X, y, 0.1, compiled=True)
out["dtypes"] = sorted({str(v.dtype) for v in a.get_weights(mixed).values()})
try:
    a.forward(full, X)
    out["refused"] = None
except Unsupported as exc:
    out["refused"] = str(exc)
print(repr(out))
"""
    done = _child(code)
    assert done.returncode == 0, done.stderr[-3000:]
    out = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307  (our own child's repr of a dict)
    assert 100 * bound("inference", "float32") < out["error"] <= bound("inference", "bfloat16", pairwise=True)
    assert out["dtypes"] == ["float32"]
    assert out["refused"] and "would compute in bfloat16" in out["refused"]


@pytest.mark.slow
@pytest.mark.parametrize("threads,seed", [(1, 3), (2, 9)])
def test_bfloat16_parity_holds_with_one_and_two_threads(
    request: pytest.FixtureRequest, threads: int, seed: int
) -> None:
    """`densenet parity --precision bfloat16`: every backend within the bfloat16 bounds of the
    float64 oracle and of each other, in a child process (MXNet's AMP)."""
    names = ",".join(participating_backends(request.config))
    env = {**os.environ, **sweep_environment(threads, onednn=True)}
    cmd = [sys.executable, "-m", "common", "parity", "--backends", names, "--precision", "bfloat16"]
    done = subprocess.run(
        [*cmd, "--steps", "10", "--seeds", str(seed), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    report = json.loads(done.stdout)
    assert report["precision"] == "bfloat16" and report["unit_roundoff"] == 2.0**-8
    failed = [c for c in report["comparisons"] if not c["passed"]]
    assert done.returncode == 0 and not failed and not report["errors"], (failed, report["errors"], done.stderr[-2000:])


def test_the_cli_refuses_bfloat16_with_float64(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("parity", "compare"):
        code, _, err = run_cli(capsys, command, "--backends", "torch", "--precision", "bfloat16", "--dtype", "float64")
        assert code == 2 and "--precision bfloat16 keeps float32 weights" in err, (command, err)


def test_training_settings_record_the_precision() -> None:
    from common.training.settings import TrainingError, TrainSettings

    assert TrainSettings(backend="torch", precision="bfloat16").to_dict()["precision"] == "bfloat16"
    with pytest.raises(TrainingError, match="precision must be one of"):
        TrainSettings(backend="torch", precision="half")
    with pytest.raises(TrainingError, match="bfloat16 trains in one process only; drop --workers and --distributed"):
        TrainSettings(backend="torch", precision="bfloat16", workers=2)
