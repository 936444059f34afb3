"""The numpy reference DenseNet, checked against naive loops and the channel plan."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from common.arch import canonical_spec, plan, stage_names
from common.config import BN_EPS, DenseNetConfig
from common.errors import InputError, WeightFileError
from common.oracle import reference as ref
from common.weights.canonical import init_canonical

RTOL = 1e-12


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------
# Naive loop versions of each primitive


def naive_conv(X: np.ndarray, W: np.ndarray, b: np.ndarray | None, stride: int, padding: int) -> np.ndarray:
    n, c, h, w = X.shape
    o, _, kh, kw = W.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    Y = np.zeros((n, o, ho, wo))
    for i in range(n):
        for q in range(o):
            for y in range(ho):
                for x in range(wo):
                    acc = b[q] if b is not None else 0.0
                    for ch in range(c):
                        for u in range(kh):
                            for v in range(kw):
                                r, s = y * stride + u - padding, x * stride + v - padding
                                if 0 <= r < h and 0 <= s < w:
                                    acc += X[i, ch, r, s] * W[q, ch, u, v]
                    Y[i, q, y, x] = acc
    return Y


def naive_pool(X: np.ndarray, kernel: int, stride: int, padding: int, reduce: Callable) -> np.ndarray:
    n, c, h, w = X.shape
    ho = (h + 2 * padding - kernel) // stride + 1
    wo = (w + 2 * padding - kernel) // stride + 1
    Y = np.zeros((n, c, ho, wo))
    for i in range(n):
        for ch in range(c):
            for y in range(ho):
                for x in range(wo):
                    vals = [
                        X[i, ch, y * stride + u - padding, x * stride + v - padding]
                        for u in range(kernel)
                        for v in range(kernel)
                        if 0 <= y * stride + u - padding < h and 0 <= x * stride + v - padding < w
                    ]
                    Y[i, ch, y, x] = reduce(vals)
    return Y


# ---------------------------------------------------------------------------------------------
# Primitives


@pytest.mark.parametrize(("stride", "padding", "kernel"), [(1, 0, 3), (1, 1, 3), (2, 3, 7), (2, 1, 3), (1, 0, 1)])
def test_conv2d_matches_loops(rng: np.random.Generator, stride, padding, kernel) -> None:
    X = rng.standard_normal((2, 3, 9, 8))
    W = rng.standard_normal((4, 3, kernel, kernel))
    b = rng.standard_normal(4)
    got = ref.conv2d(X, W, b, stride, padding)
    np.testing.assert_allclose(got, naive_conv(X, W, b, stride, padding), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(ref.conv2d(X, W, None, stride, padding), got - b.reshape(1, -1, 1, 1), atol=1e-12)


def test_conv2d_rejects_channel_mismatch(rng: np.random.Generator) -> None:
    with pytest.raises(InputError):
        ref.conv2d(rng.standard_normal((1, 3, 5, 5)), rng.standard_normal((2, 4, 3, 3)), None)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)])
def test_max_pool_matches_loops(rng: np.random.Generator, kernel, stride, padding) -> None:
    X = rng.standard_normal((2, 3, 7, 6))
    got = ref.max_pool2d(X, kernel, stride, padding)
    np.testing.assert_array_equal(got, naive_pool(X, kernel, stride, padding, max))


def test_max_pool_never_picks_padding(rng: np.random.Generator) -> None:
    X = -1.0 - rng.random((2, 2, 5, 5))  # every value below zero, the usual padding value
    Y = ref.max_pool2d(X, 3, 2, 1)
    assert np.all(Y < -1.0)
    assert np.all(np.isfinite(Y))
    np.testing.assert_array_equal(Y, naive_pool(X, 3, 2, 1, max))
    with pytest.raises(ValueError, match="at most half"):
        ref.max_pool2d(X, 3, 1, 2)


@pytest.mark.parametrize(("kernel", "stride"), [(2, 2), (3, 1), (2, 1)])
def test_avg_pool_matches_loops(rng: np.random.Generator, kernel, stride) -> None:
    X = rng.standard_normal((2, 3, 7, 6))
    got = ref.avg_pool2d(X, kernel, stride)
    np.testing.assert_allclose(got, naive_pool(X, kernel, stride, 0, lambda v: sum(v) / len(v)), rtol=RTOL)


def test_global_pool_relu_linear(rng: np.random.Generator) -> None:
    X = rng.standard_normal((2, 3, 4, 5))
    expect = np.array([[X[i, c].sum() / 20 for c in range(3)] for i in range(2)])
    np.testing.assert_allclose(ref.global_avg_pool(X), expect, rtol=RTOL)

    np.testing.assert_array_equal(ref.relu(X), np.where(X > 0, X, 0.0))

    A, W, b = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal(5)
    loops = np.array([[sum(A[i, k] * W[o, k] for k in range(3)) + b[o] for o in range(5)] for i in range(4)])
    np.testing.assert_allclose(ref.linear(A, W, b), loops, rtol=RTOL)


def test_cross_entropy_matches_loops_and_is_stable(rng: np.random.Generator) -> None:
    logits = rng.standard_normal((6, 4)) * 3
    y = np.array([0, 3, 1, 2, 2, 0])
    loops = -sum(math.log(math.exp(logits[i, y[i]]) / sum(math.exp(v) for v in logits[i])) for i in range(6)) / 6
    assert ref.cross_entropy(logits, y) == pytest.approx(loops, rel=RTOL)
    # Shifting the logits changes nothing, even by amounts that overflow a naive exp.
    assert ref.cross_entropy(logits + 1000.0, y) == pytest.approx(loops, rel=1e-9)
    assert math.isfinite(ref.cross_entropy(np.array([[1e4, -1e4]]), np.array([1])))
    with pytest.raises(InputError):
        ref.cross_entropy(logits, np.array([0, 1, 2, 3, 4, 5]))


def naive_bn_train(
    X: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Y = np.empty_like(X)
    means, variances = [], []
    for c in range(X.shape[1]):
        vals = X[:, c].ravel()
        m = sum(vals) / len(vals)
        v = sum((x - m) ** 2 for x in vals) / len(vals)
        Y[:, c] = (X[:, c] - m) / math.sqrt(v + eps) * weight[c] + bias[c]
        means.append(m)
        variances.append(v)
    return Y, np.array(means), np.array(variances)


@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_training_matches_loops(rng: np.random.Generator, unbiased) -> None:
    X = rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.5
    Y, new_m, new_v = ref.batch_norm(X, w, b, rm, rv, True, momentum=0.3, unbiased_running_var=unbiased)
    Y_loop, m, v = naive_bn_train(X, w, b, BN_EPS)
    np.testing.assert_allclose(Y, Y_loop, rtol=1e-11, atol=1e-12)
    n = 3 * 5 * 2
    fed = v * n / (n - 1) if unbiased else v
    np.testing.assert_allclose(new_m, 0.7 * rm + 0.3 * m, rtol=RTOL)
    np.testing.assert_allclose(new_v, 0.7 * rv + 0.3 * fed, rtol=RTOL)


def test_batch_norm_inference_uses_running_stats(rng: np.random.Generator) -> None:
    X = rng.standard_normal((2, 3, 4, 4))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    Y, out_m, out_v = ref.batch_norm(X, w, b, rm, rv, False)
    expect = np.empty_like(X)
    for c in range(3):
        expect[:, c] = (X[:, c] - rm[c]) / math.sqrt(rv[c] + BN_EPS) * w[c] + b[c]
    np.testing.assert_allclose(Y, expect, rtol=RTOL)
    np.testing.assert_array_equal(out_m, rm)
    np.testing.assert_array_equal(out_v, rv)


def test_batch_norm_running_var_d2l_fact() -> None:
    X = np.arange(8.0).reshape(8, 1, 1, 1)
    one, zero = np.ones(1), np.zeros(1)
    _, mean, var = ref.batch_norm(X, one, zero, zero, one, True, momentum=0.1)
    assert mean[0] == pytest.approx(0.35)
    assert var[0] == pytest.approx(1.5)  # 0.9 * 1 + 0.1 * 6 (unbiased variance of 0..7)
    _, _, var_biased = ref.batch_norm(X, one, zero, zero, one, True, momentum=0.1, unbiased_running_var=False)
    assert var_biased[0] == pytest.approx(1.425)  # 0.9 * 1 + 0.1 * 5.25
    with pytest.raises(InputError):
        ref.batch_norm(np.ones((1, 1, 1, 1)), one, zero, zero, one, True)


# ---------------------------------------------------------------------------------------------
# Blocks and the whole network

SMALL = DenseNetConfig(num_channels=4, growth_rate=3, arch=(2, 2), num_classes=5, in_channels=2)


def test_dense_block_keeps_its_input_channels(rng: np.random.Generator) -> None:
    w = init_canonical(SMALL, 0)
    X = rng.standard_normal((2, 4, 5, 5))
    Y, stats = ref.dense_block(X, w, "dense1", 2, training=True)
    assert Y.shape == (2, 4 + 2 * 3, 5, 5)
    np.testing.assert_array_equal(Y[:, :4], X)
    assert set(stats) == {f"dense1.conv{j}.bn.{leaf}" for j in (1, 2) for leaf in ("running_mean", "running_var")}
    _, no_stats = ref.dense_block(X, w, "dense1", 2, training=False)
    assert no_stats == {}

    T, _ = ref.transition(Y, w, "transition1", training=False)
    assert T.shape == (2, 5, 2, 2)


def test_forward_default_config_stage_shapes(rng: np.random.Generator) -> None:
    config = DenseNetConfig()
    X = rng.standard_normal((2, 1, 32, 32))
    logits, stages, stats = ref.forward(config, init_canonical(config, 0), X)
    assert list(stages) == stage_names(config)
    assert {k: v.shape for k, v in stages.items()} == plan(config, 32).shapes(2)
    assert logits.shape == (2, 10) and logits is stages["head"]
    assert stats == {}
    assert all(np.all(np.isfinite(v)) for v in stages.values())


def test_forward_training_updates_every_running_stat(rng: np.random.Generator) -> None:
    w = init_canonical(SMALL, 3)
    X = rng.standard_normal((4, 2, 40, 36))
    logits_train, _, stats = ref.forward(SMALL, w, X, training=True, dtype=np.float64)
    spec = canonical_spec(SMALL)
    assert list(stats) == [k for k in spec if k.endswith(("running_mean", "running_var"))]
    for name, value in stats.items():
        assert value.shape == spec[name] and value.dtype == np.float64
        assert not np.allclose(value, w[name])
    logits_eval, _, _ = ref.forward(SMALL, w, X, training=False, dtype=np.float64)
    assert logits_train.dtype == np.float64
    assert not np.allclose(logits_train, logits_eval)
    # The biased convention moves only the variances.
    _, _, biased = ref.forward(SMALL, w, X, training=True, conventions=ref.Conventions(unbiased_running_var=False))
    for name in stats:
        if name.endswith("running_mean"):
            np.testing.assert_allclose(biased[name], stats[name], rtol=1e-6)
        else:
            assert np.all(biased[name] < stats[name])


def test_forward_stem_matches_primitives(rng: np.random.Generator) -> None:
    w = {k: v.astype(np.float64) for k, v in init_canonical(SMALL, 5).items()}
    X = rng.standard_normal((2, 2, 30, 30))
    _, stages, _ = ref.forward(SMALL, w, X)
    Y = naive_conv(X, w["stem.conv.weight"], w["stem.conv.bias"], 2, 3)
    Y, _, _ = ref.batch_norm(Y, *(w[f"stem.bn.{k}"] for k in ("weight", "bias", "running_mean", "running_var")), False)
    Y = naive_pool(np.maximum(Y, 0), 3, 2, 1, max)
    np.testing.assert_allclose(stages["stem"], Y, rtol=1e-10, atol=1e-12)


def test_forward_refuses_bad_inputs(rng: np.random.Generator) -> None:
    w = init_canonical(SMALL, 0)
    with pytest.raises(InputError, match="channel"):
        ref.forward(SMALL, w, rng.standard_normal((1, 3, 32, 32)))
    with pytest.raises(InputError, match="too small"):
        ref.forward(SMALL, w, rng.standard_normal((1, 2, 4, 4)))
    broken = dict(w)
    del broken["head.fc.bias"]
    with pytest.raises(WeightFileError, match="head.fc.bias"):
        ref.forward(SMALL, broken, rng.standard_normal((1, 2, 32, 32)))


def test_init_weights_is_seeded_and_canonical() -> None:
    config = DenseNetConfig()
    a, b, c = init_canonical(config, 7), init_canonical(config, 7), init_canonical(config, 8)
    spec = canonical_spec(config)
    assert list(a) == list(spec)
    for name, shape in spec.items():
        assert a[name].shape == shape and a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["stem.conv.weight"], c["stem.conv.weight"])

    assert np.all(np.abs(a["stem.bn.weight"] - 1) <= 0.1) and not np.all(a["stem.bn.weight"] == 1)
    assert np.all(np.abs(a["head.bn.bias"]) <= 0.1) and np.any(a["head.bn.bias"] != 0)
    assert np.all((a["head.bn.running_var"] >= 0.5) & (a["head.bn.running_var"] <= 1.5))
    fan_in = 64 * 9
    kernel = a["dense2.conv3.conv.weight"]
    assert kernel.shape[1] == (64 + 4 * 32) // 2 + 2 * 32
    assert abs(kernel.std() - math.sqrt(2 / (kernel.shape[1] * 9))) < 0.01
    assert np.all(np.abs(a["dense1.conv1.conv.bias"]) <= 1 / math.sqrt(fan_in))


# --- the oracle's gradients (common.oracle.reference_grad) ----------------------------------------------

GRAD_CASES = {
    "plain": DenseNetConfig(num_channels=4, growth_rate=3, arch=(2, 1)),
    "bc": DenseNetConfig(num_channels=4, growth_rate=3, arch=(1, 1), bn_size=2, conv_bias=False, in_channels=2),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_finite_differences(name: str) -> None:
    """Every hand-written derivative against central differences of the forward pass, in float64."""
    from common.oracle import reference_grad
    from common.weights.canonical import init_canonical

    config = GRAD_CASES[name]
    w = {k: v.astype(np.float64) for k, v in init_canonical(config, 0).items()}
    rng = np.random.default_rng(0)
    X = rng.random((3, config.in_channels, 31, 30))  # odd size: floor in every pooling
    y = rng.integers(0, config.num_classes, 3)
    g = reference_grad.loss_and_grads(config, w, X, y)

    def loss(weights, images) -> float:
        logits, _, _ = ref.forward(config, weights, images, training=True)
        return ref.cross_entropy(logits, y)

    h = 1e-6
    for k, grad in g.params.items():
        assert grad.shape == w[k].shape
        assert g.param_scales[k] >= np.max(np.abs(grad))  # the sum of |terms| bounds |sum|
        for i in rng.choice(grad.size, min(3, grad.size), replace=False):
            plus, minus = dict(w), dict(w)
            plus[k], minus[k] = w[k].copy(), w[k].copy()
            plus[k].flat[i] += h
            minus[k].flat[i] -= h
            fd = (loss(plus, X) - loss(minus, X)) / (2 * h)
            assert abs(fd - grad.flat[i]) <= 1e-7 * g.param_scales[k], (k, i)
    for i in rng.choice(X.size, 5, replace=False):
        plus, minus = X.copy(), X.copy()
        plus.flat[i] += h
        minus.flat[i] -= h
        fd = (loss(w, plus) - loss(w, minus)) / (2 * h)
        assert abs(fd - g.input.flat[i]) <= 1e-7 * g.input_scale
    logits, _, stats = ref.forward(config, w, X, training=True)
    np.testing.assert_allclose(g.logits, logits, rtol=0, atol=1e-13)
    assert g.loss == pytest.approx(ref.cross_entropy(logits, y), abs=1e-13)
    for k, v in stats.items():
        np.testing.assert_allclose(g.stats[k], v, rtol=0, atol=1e-13)


def test_sgd_steps_follow_the_gradients() -> None:
    from common.oracle import reference_grad
    from common.weights.canonical import init_canonical

    config = GRAD_CASES["plain"]
    w0 = init_canonical(config, 1)
    rng = np.random.default_rng(1)
    batches = [(rng.random((4, 1, 32, 32)), rng.integers(0, 10, 4)) for _ in range(2)]
    losses, w2 = reference_grad.sgd_steps(config, w0, batches, lr=0.1)
    g0 = reference_grad.loss_and_grads(config, w0, *batches[0])
    w1 = {k: w0[k] - 0.1 * g0.params[k] if k in g0.params else g0.stats.get(k, w0[k]) for k in w0}
    g1 = reference_grad.loss_and_grads(config, w1, *batches[1])
    assert losses == [g0.loss, g1.loss]
    for k in w2:
        expected = w1[k] - 0.1 * g1.params[k] if k in g1.params else g1.stats.get(k, w1[k])
        np.testing.assert_allclose(w2[k], expected, rtol=0, atol=1e-15)


def test_oracle_gradients_refuse_dropout_and_bad_labels() -> None:
    from common.oracle import reference_grad
    from common.weights.canonical import init_canonical

    config = GRAD_CASES["plain"].replace(drop_rate=0.2)
    w = init_canonical(config, 0)
    X = np.zeros((2, 1, 32, 32))
    with pytest.raises(InputError, match="dropout"):
        reference_grad.loss_and_grads(config, w, X, np.array([0, 1]))
    with pytest.raises(InputError, match="labels"):
        reference_grad.loss_and_grads(GRAD_CASES["plain"], init_canonical(GRAD_CASES["plain"], 0), X, np.array([0, 10]))
