"""The optimiser (common.training.optim): one definition of SGD with momentum, Nesterov and weight decay,
computed by every framework's own optimizer; the schedules; the optimiser state in canonical form."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from common.registry import BACKENDS
from common.training.optim import (
    DECOUPLED_WEIGHT_DECAY,
    FOLDED_LR,
    SGD,
    SUITE,
    LRSchedule,
    OptimizerError,
    sgd_update,
    state_spec,
)
from common.verify.parity import PARITY_CASE
from tests.helpers import run_cli

WORDS = [
    SGD(),
    SGD(weight_decay=0.01),
    SGD(momentum=0.9),
    SGD(momentum=0.9, weight_decay=0.01),
    SGD(momentum=0.9, nesterov=True),
    SGD(momentum=0.9, nesterov=True, weight_decay=0.01),
]
IDS = ["plain", "wd", "momentum", "momentum-wd", "nesterov", "nesterov-wd"]
LRS = [0.1, 0.05, 0.2, 0.01, 0.1]  # changes every step: where the conventions part


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((3, 4))
    return w0, [rng.standard_normal((3, 4)) for _ in LRS]


def _numpy(w0, grads, lrs, sgd, convention=SUITE):
    w, v = w0, None
    for g, lr in zip(grads, lrs):
        w, v = sgd_update(w, g, v, lr, sgd, convention)
    return w


def test_the_definition_is_pytorchs_written_out() -> None:
    """Two steps by hand: b = m b + g + wd w; w -= lr (g + wd w + m b) (Nesterov) or lr b."""
    w, g1, g2 = np.array([1.0]), np.array([0.5]), np.array([-0.25])
    sgd = SGD(momentum=0.5, nesterov=True, weight_decay=0.1)
    w1, b1 = sgd_update(w, g1, None, 0.1, sgd)
    assert b1 == pytest.approx(0.6) and w1 == pytest.approx(1 - 0.1 * (0.6 + 0.5 * 0.6))
    w2, b2 = sgd_update(w1, g2, b1, 0.2, sgd)
    d = -0.25 + 0.1 * w1
    assert b2 == pytest.approx(0.5 * 0.6 + d) and w2 == pytest.approx(w1 - 0.2 * (d + 0.5 * b2))


def test_conventions_agree_only_where_they_should() -> None:
    """Folding the rate into the velocity changes nothing at a constant rate and everything once it
    changes; decoupled decay equals coupled without momentum."""
    w0, grads = _problem()
    m = SGD(momentum=0.9)
    np.testing.assert_allclose(_numpy(w0, grads, [0.1] * 5, m, FOLDED_LR), _numpy(w0, grads, [0.1] * 5, m), atol=1e-14)
    assert np.max(np.abs(_numpy(w0, grads, LRS, m, FOLDED_LR) - _numpy(w0, grads, LRS, m))) > 1e-2
    plain = SGD(weight_decay=0.01)
    np.testing.assert_allclose(_numpy(w0, grads, LRS, plain, DECOUPLED_WEIGHT_DECAY), _numpy(w0, grads, LRS, plain))
    wd = SGD(momentum=0.9, weight_decay=0.01)
    assert np.max(np.abs(_numpy(w0, grads, LRS, wd, DECOUPLED_WEIGHT_DECAY) - _numpy(w0, grads, LRS, wd))) > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum": 1.0}, "momentum must be in [0, 1)"),
        ({"momentum": -0.1}, "momentum must be in [0, 1)"),
        ({"momentum": float("nan")}, "momentum must be a finite number"),
        ({"nesterov": True}, "Nesterov momentum needs a momentum above 0"),
        ({"weight_decay": -1e-4}, "weight decay must be 0 or more"),
    ],
)
def test_sgd_refuses_meaningless_settings(kwargs, message: str) -> None:
    with pytest.raises(OptimizerError, match=message.replace("[", r"\[").replace(")", r"\)")):
        SGD(**kwargs)


def test_schedules_follow_their_formulas() -> None:
    lr, spe, epochs = 0.1, 10, 4  # 40 steps
    assert [LRSchedule().lr_at(lr, t, spe, epochs) for t in (0, 39)] == [lr, lr]
    cosine = LRSchedule("cosine")
    assert cosine.lr_at(lr, 20, spe, epochs) == pytest.approx(0.05)
    warm = LRSchedule("cosine", warmup_epochs=1)  # 10 warm-up steps, then cosine over 30
    assert [warm.lr_at(lr, t, spe, epochs) for t in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    assert warm.lr_at(lr, 10, spe, epochs) == pytest.approx(lr)
    assert warm.lr_at(lr, 25, spe, epochs) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    step = LRSchedule("step", milestones=(1, 3), gamma=0.5)
    assert [step.lr_at(lr, t, spe, epochs) for t in (9, 10, 29, 30)] == pytest.approx([0.1, 0.05, 0.05, 0.025])
    step_warm = LRSchedule("step", milestones=(2,), warmup_epochs=0.5)
    assert [step_warm.lr_at(lr, t, spe, epochs) for t in (0, 4, 5, 20)] == pytest.approx([0.02, 0.1, 0.1, 0.01])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "linear"}, "lr_schedule must be one of constant, cosine, step"),
        ({"kind": "step"}, "needs milestones"),
        ({"kind": "step", "milestones": (3, 2)}, "milestones must increase"),
        ({"kind": "cosine", "milestones": (2,)}, "milestones belong to the step schedule"),
        ({"kind": "step", "milestones": (2,), "gamma": 0.0}, "gamma must be in"),
        ({"warmup_epochs": -1}, "warm-up epochs must be 0 or more"),
    ],
)
def test_schedule_refuses_meaningless_settings(kwargs, message: str) -> None:
    with pytest.raises(OptimizerError, match=message):
        LRSchedule(**kwargs)


def test_schedule_must_fit_the_run() -> None:
    with pytest.raises(OptimizerError, match="warm-up .* must end before the run"):
        LRSchedule("cosine", warmup_epochs=3).check(3)
    with pytest.raises(OptimizerError, match="milestone 5 is not before the last epoch"):
        LRSchedule("step", milestones=(5,)).check(5)


@pytest.mark.parametrize("sgd", WORDS, ids=IDS)
def test_each_frameworks_optimizer_computes_the_definition(backend_name: str, adapter, sgd: SGD) -> None:
    """The framework's own optimizer, configured or wrapped (densenet_<fw>.optim), in float64."""
    optim = importlib.import_module(f"{BACKENDS[backend_name].package}.optim")
    w0, grads = _problem(1)
    got = optim.apply_steps(w0, grads, LRS, sgd)
    np.testing.assert_allclose(got, _numpy(w0, grads, LRS, sgd), rtol=0, atol=1e-14)


@pytest.mark.parametrize("sgd", WORDS, ids=IDS)
def test_each_frameworks_stock_optimizer_reads_the_words_as_documented(backend_name: str, adapter, sgd: SGD) -> None:
    """What docs/departures.md says of each stock optimizer (``stock_convention``), measured: within
    float32 rounding of the rate (MXNet's ops) or momentum (Keras casts it through float32)."""
    optim = importlib.import_module(f"{BACKENDS[backend_name].package}.optim")
    w0, grads = _problem(2)
    stock = optim.apply_steps(w0, grads, LRS, sgd, stock=True)
    convention = optim.stock_convention(sgd)
    if backend_name == "mxnet" and sgd.nesterov and sgd.weight_decay:
        # MXNet's nag kernel writes the new weight in place, then reads it for the velocity's decay term.
        assert np.max(np.abs(stock - _numpy(w0, grads, LRS, sgd, convention))) > 1e-4
    else:
        np.testing.assert_allclose(stock, _numpy(w0, grads, LRS, sgd, convention), rtol=0, atol=1e-6)
    if convention != SUITE and sgd.has_state:
        assert np.max(np.abs(stock - _numpy(w0, grads, LRS, sgd))) > 1e-2


def test_optimizer_state_round_trips_in_canonical_form(backend_name: str, adapter) -> None:
    sgd = SGD(momentum=0.9, nesterov=True)
    model = adapter.build(PARITY_CASE, seed=0)
    assert adapter.get_optimizer_state(model) == {}  # plain SGD keeps none
    adapter.configure_optimizer(model, sgd)
    spec = state_spec(PARITY_CASE, sgd)
    state = adapter.get_optimizer_state(model)
    assert list(state) == list(spec) and all(not v.any() for v in state.values())
    assert "dense1.conv1.conv.weight.momentum_buffer" in state and not any("running" in k for k in state)
    rng = np.random.default_rng(0)
    given = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in spec.items()}
    adapter.set_optimizer_state(model, given)
    for k, v in adapter.get_optimizer_state(model).items():
        np.testing.assert_array_equal(v, given[k], err_msg=k)
    bad = dict(given)
    bad.pop("head.fc.bias.momentum_buffer")
    bad["stem.conv.weight.momentum_buffer"] = np.zeros((1, 2), np.float32)
    with pytest.raises(OptimizerError, match=r"missing 1 tensor\(s\): head.fc.bias.momentum_buffer"):
        adapter.set_optimizer_state(model, bad)
    np.testing.assert_array_equal(
        adapter.get_optimizer_state(model)["head.fc.bias.momentum_buffer"], given["head.fc.bias.momentum_buffer"]
    )  # nothing loaded
    adapter.configure_optimizer(model, sgd)  # starts again from zero
    assert all(not v.any() for v in adapter.get_optimizer_state(model).values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nesterov"], "Nesterov momentum needs a momentum above 0"),
        (["--momentum", "1"], "momentum must be in [0, 1)"),
        (["--lr-schedule", "step"], "the step schedule needs milestones"),
        (["--lr-schedule", "step", "--lr-milestones", "10"], "milestone 10 is not before the last epoch"),
        (["--warmup-epochs", "10"], "must end before the run"),
    ],
)
def test_train_refuses_meaningless_optimiser_options(
    capsys: pytest.CaptureFixture[str], tmp_path, args: list[str], message: str
) -> None:
    from tests.test_cli_errors import assert_one_clear_error

    code, _, err = run_cli(capsys, "train", "--backend", "torch", "--out", tmp_path / "run", *args)
    assert_one_clear_error(code, err, 2, message)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_file_carries_the_velocities_apart_from_the_weights(tmp_path) -> None:
    from common.errors import WeightFileError
    from common.weights.canonical import init_canonical, load_canonical, save_weights

    w = init_canonical(PARITY_CASE, 0)
    spec = state_spec(PARITY_CASE, SGD(momentum=0.9))
    rng = np.random.default_rng(1)
    state = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in spec.items()}
    save_weights(tmp_path / "c.safetensors", w, PARITY_CASE, optimizer_state=state)
    found = load_canonical(tmp_path / "c.safetensors", PARITY_CASE)
    assert list(found.weights) == list(w) and list(found.optimizer_state) == list(spec)
    for k, v in state.items():
        np.testing.assert_array_equal(found.optimizer_state[k], v)
    assert load_canonical(tmp_path / "c.safetensors").optimizer_state  # any reader of weights ignores them
    save_weights(tmp_path / "plain.safetensors", w, PARITY_CASE)
    assert load_canonical(tmp_path / "plain.safetensors").optimizer_state == {}
    partial = dict(state)
    partial.pop("head.fc.weight.momentum_buffer")
    with pytest.raises(WeightFileError, match=r"missing 1 tensor\(s\): head.fc.weight.momentum_buffer"):
        save_weights(tmp_path / "bad.safetensors", w, PARITY_CASE, optimizer_state=partial)
    assert not (tmp_path / "bad.safetensors").exists()
