"""The memory-efficient DenseNet (``memory_efficient=True``): the same function and gradients as the
standard network, BatchNorm running statistics updated exactly once per step, and the
recomputation really happening (docs/performance.md)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from common.arch import is_state
from common.oracle import reference_grad
from common.verify.parity import PARITY_CASE, bound
from tests.helpers import images

# One dense block of the parity case's widths, as the book builds it and as DenseNet-BC does
# (bottleneck: the recomputed part ends at the 1x1 conv). One block keeps JAX's compilations
# short; growth rate 16: MXNet's oneDNN backward fails for some narrower layouts (test_backends).
ONE_BLOCK = PARITY_CASE.replace(arch=(2,))
CASES = {"d2l-block": ONE_BLOCK, "bc-block": ONE_BLOCK.replace(bn_size=2, conv_bias=False)}


def _errors(a: dict[str, np.ndarray], b: dict[str, np.ndarray], scales: dict[str, float]) -> tuple[float, str]:
    """Largest ``max |a - b| / scale`` over the tensors of ``b``, with the error model's scales
    (the float64 oracle's: a gradient that cancels to nearly zero, such as a conv bias before a
    BatchNorm, is judged against the size of the terms it sums, not its own)."""
    worst, where = 0.0, ""
    for k, y in b.items():
        e = float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(y, np.float64)))) / scales[k]
        if not e <= worst:  # NaN included
            worst, where = e, k
    return worst, where


def _scales(adapter, model, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The oracle's scale of the input gradient (``"dX"``), every gradient and running statistic."""
    g = reference_grad.loss_and_grads(model.config, adapter.get_weights(model), X.astype(np.float64), y)
    return {"dX": g.input_scale, **g.param_scales, **g.stat_scales}


def _pair(adapter, config, dtype="float32"):
    standard = adapter.build(config, seed=0, dtype=dtype)
    efficient = adapter.build(config, seed=0, dtype=dtype, memory_efficient=True)
    adapter.set_weights(efficient, adapter.get_weights(standard))
    return standard, efficient


@pytest.mark.parametrize("case", CASES)
def test_gradients_and_running_stats_match_the_standard_network(adapter, case: str) -> None:
    config = CASES[case]
    rng = np.random.default_rng(1)
    X = images(rng, (4, 1, 32, 32))
    y = rng.integers(0, 10, 4)
    standard, efficient = _pair(adapter, config)
    scales = _scales(adapter, standard, X, y)
    loss_s, dX_s, grads_s = adapter.loss_and_grads(standard, X, y)
    loss_e, dX_e, grads_e = adapter.loss_and_grads(efficient, X, y)
    assert abs(loss_e - loss_s) <= bound("train-forward", "float32") * abs(loss_s)
    error, where = _errors({"dX": dX_e}, {"dX": dX_s}, scales)
    assert error <= bound("grad-input", "float32"), (error, where)
    error, where = _errors(grads_e, grads_s, scales)
    assert error <= bound("grad-params", "float32"), (error, where)
    # One training-mode pass each: the running statistics took the batch once in both. Counted
    # twice, they would differ by about the momentum times the batch statistic (0.1, not 1e-5).
    stats_s = {k: v for k, v in adapter.get_weights(standard).items() if is_state(k)}
    stats_e = {k: v for k, v in adapter.get_weights(efficient).items() if is_state(k)}
    error, where = _errors(stats_e, stats_s, scales)
    assert error <= bound("running-stats", "float32"), (error, where)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_steps_match_the_standard_network(adapter, backend_name: str, compiled: bool) -> None:
    if backend_name == "jax" and not compiled:
        pytest.skip("JAX's training step is always jitted: the compiled case covers it")
    rng = np.random.default_rng(2)
    X = images(rng, (4, 1, 32, 32))
    y = rng.integers(0, 10, 4)
    standard, efficient = _pair(adapter, PARITY_CASE)  # two blocks and a transition
    oracle = _scales(adapter, standard, X, y)
    lr = 0.1
    loss_s, _ = adapter.train_step(standard, X, y, lr, compiled=compiled)
    loss_e, _ = adapter.train_step(efficient, X, y, lr, compiled=compiled)
    # A weight after the step, w - lr * g, is judged against its size or its update's scale
    # (a conv bias that starts at zero moves by pure rounding); a running statistic by the oracle's.
    weights_s = adapter.get_weights(standard)
    scales = {
        k: oracle[k] if is_state(k) else max(float(np.max(np.abs(v))), lr * oracle[k]) for k, v in weights_s.items()
    }
    error, where = _errors(adapter.get_weights(efficient), weights_s, scales)
    assert error <= bound("sgd-step", "float32"), (error, where)
    assert abs(loss_e - loss_s) <= bound("train-forward", "float32") * abs(loss_s)


def test_dropout_drops_after_the_recomputed_part(adapter) -> None:
    """DenseNet-BC with dropout: the memory-efficient network applies its own masks in training,
    after the recomputed part, and its gradients stay finite."""
    config = CASES["bc-block"].replace(drop_rate=0.5)
    rng = np.random.default_rng(4)
    X = images(rng, (4, 1, 32, 32))
    y = rng.integers(0, 10, 4)
    dropping = adapter.build(config, seed=0, memory_efficient=True)
    keeping = adapter.build(config.replace(drop_rate=0.0), seed=0, memory_efficient=True)
    adapter.set_weights(keeping, adapter.get_weights(dropping))
    scales = _scales(adapter, keeping, X, y)
    loss_d, dX_d, grads_d = adapter.loss_and_grads(dropping, X, y)
    _, dX_k, grads_k = adapter.loss_and_grads(keeping, X, y)
    assert np.isfinite(loss_d) and np.all(np.isfinite(dX_d))
    assert all(np.all(np.isfinite(g)) for g in grads_d.values())
    # Half the new features zeroed and the rest doubled moves the gradients far beyond rounding.
    error, _ = _errors({"dX": dX_d, **grads_d}, {"dX": dX_k, **grads_k}, scales)
    assert error > 1000 * bound("grad-params", "float32"), error


def test_float64_is_exact_to_the_claim(adapter) -> None:
    rng = np.random.default_rng(3)
    X = images(rng, (2, 1, 32, 32)).astype(np.float64)
    y = rng.integers(0, 10, 2)
    standard, efficient = _pair(adapter, CASES["bc-block"], dtype="float64")
    scales = _scales(adapter, standard, X, y)
    _, dX_s, grads_s = adapter.loss_and_grads(standard, X, y)
    _, dX_e, grads_e = adapter.loss_and_grads(efficient, X, y)
    assert _errors({"dX": dX_e, **grads_e}, {"dX": dX_s, **grads_s}, scales)[0] <= bound("grad-params", "float64")
    stats_s = {k: v for k, v in adapter.get_weights(standard).items() if is_state(k)}
    assert _errors(adapter.get_weights(efficient), stats_s, scales)[0] <= bound("running-stats", "float64")


def _count_calls(obj, method: str, counter: list[int]) -> None:
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    setattr(obj, method, counted)


def _normalisations(adapter, backend_name: str, efficient: bool, X: np.ndarray, y: np.ndarray) -> int:
    """How often one training pass evaluates dense block 1's first BatchNorm (TF: the padding
    before the 3x3 conv, the BatchNorm not being a layer call there, and the conv itself not
    rerun; JAX: every BatchNorm of the gradient's program, counted by its rsqrt)."""
    model = adapter.build(ONE_BLOCK, seed=0, memory_efficient=efficient)
    counter = [0]
    if backend_name == "jax":
        import jax

        from densenet_jax.adapter import _loss

        v = model.variables
        unbias = adapter._unbias_tree(model, X.shape)
        rest = (v["batch_stats"], adapter.prepare(model, X), y, jax.random.PRNGKey(0), unbias)
        net = model.net.clone(training=True)
        program = jax.make_jaxpr(jax.grad(lambda p: _loss(net, p, *rest)[0]))(v["params"])
        return len(re.findall(r"\brsqrt\b", str(program)))
    if backend_name in ("torch", "mxnet"):  # dense block 1, conv block 1, its BatchNorm
        model.net.net[1].net[0][0].register_forward_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
    else:  # tf: BN, ReLU, ZeroPadding2D, then the 3x3 conv
        _count_calls(model.net.net.layers[1].net[0].net[2], "call", counter)
    adapter.loss_and_grads(model, X, y)
    return counter[0]


def test_the_backward_pass_recomputes(adapter, backend_name: str) -> None:
    """The recomputed part runs twice per training pass in memory-efficient mode, once otherwise
    (JAX: one more BatchNorm per dense layer in the gradient's program)."""
    rng = np.random.default_rng(4)
    X = images(rng, (2, 1, 32, 32))
    y = rng.integers(0, 10, 2)
    runs = {efficient: _normalisations(adapter, backend_name, efficient, X, y) for efficient in (False, True)}
    if backend_name == "jax":
        assert runs[True] - runs[False] == ONE_BLOCK.arch[0], runs
    else:
        assert runs == {False: 1, True: 2}, runs


def test_the_book_signatures_take_the_keyword(native, backend_name: str) -> None:
    """``DenseBlock(num_convs, num_channels, memory_efficient=True)`` and the network's keyword."""
    blk = native.DenseBlock(2, 10, memory_efficient=True)
    assert blk.memory_efficient is True
    assert native.DenseBlock(2, 10).memory_efficient is False
    net = native.DenseNet.for_config(PARITY_CASE, memory_efficient=True)
    assert net.memory_efficient is True and net.config == PARITY_CASE
