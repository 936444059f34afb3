"""Every backend, through its own API and through the adapter, against the book and the plan.

Parametrised over the four backends by the ``adapter``/``native`` fixtures (conftest.py); each
parameter carries its backend's marker, so ``-m torch`` runs one framework.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from common.arch import canonical_spec, count_bn_stats, count_params, is_state, plan, plan_channels
from common.config import CONFIGS, D2L, DenseNetConfig
from common.errors import InputError
from common.registry import BACKENDS
from tests.helpers import cached_model, get_adapter, images

# Tiny networks keep every test fast; the book's network is built once per backend per module.
TINY = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
# For training: a growth rate of 8 keeps MXNet's oneDNN backward working (see MXNET_ONEDNN_XFAIL).
TRAIN = DenseNetConfig(num_channels=8, growth_rate=8, arch=(2, 2))
OTHER = DenseNetConfig(num_channels=16, growth_rate=8, arch=(3, 2, 1), num_classes=5, in_channels=3)
ACCUMULATE = DenseNetConfig(num_channels=16, growth_rate=8, arch=(2, 3, 4))

PUBLIC_NAMES = ["ConvBlock", "DenseBlock", "DenseNet", "TransitionBlock", "conv_block", "transition_block"]

LAYOUT = {"torch": "NCHW", "mxnet": "NCHW", "jax": "NHWC", "tf": "NHWC"}

# Largest |compiled - eager| difference allowed on the tiny network's logits (2x1x32x32, logits of
# magnitude ~0.3-1.1), per backend. Measured over seeds 0-2:
#   torch  torch.compile (inductor) vs eager: 1.5e-8 .. 3.0e-8 (fused/reordered float ops)
#   mxnet  hybridize() vs imperative:          0.0 (same oneDNN kernels, same order)
#   jax    jax.jit vs op-by-op dispatch:       0.0 (XLA may fuse differently in other versions)
#   tf     tf.function vs eager:               0.0 (grappler may rewrite in other versions)
COMPILED_ATOL = {"torch": 5e-7, "mxnet": 1e-7, "jax": 1e-6, "tf": 1e-6}

# MXNet 1.9.1's oneDNN (MKLDNN) backward fails for some channel layouts: training
# DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2)) on 32x32 images raises
# "MXNetError: could not construct a sub-memory" (also 16/8/(2, 2) and 8/4/(2, 2, 2)); the book's
# configuration and growth rates 8/16/32 with matching widths work, and MXNET_MKLDNN_ENABLED=0
# makes every case work. The smallest failing piece is DenseBlock(2, 4) -> transition_block(8)
# on an 8-channel input under autograd.record() + backward().
MXNET_ONEDNN_XFAIL = pytest.mark.xfail(
    condition=os.environ.get("MXNET_MKLDNN_ENABLED", "1") != "0",
    strict=True,
    reason="densenet_mxnet/adapter.py _loss_backward (loss_and_grads, train_step): MXNet oneDNN backward raises "
    "'could not construct a sub-memory' for growth_rate=4 (channel offsets not a multiple of 8)",
)


def backend_params(**extra: list[Any]) -> list[Any]:
    """The conftest parametrisation of ``backend_name``, with extra marks for some backends."""
    return [pytest.param(name, marks=[getattr(pytest.mark, name), *extra.get(name, [])], id=name) for name in BACKENDS]


# ---------------------------------------------------------------------------------------------
# Framework-specific helpers, keyed by backend name


def _apply_torch(block, X: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return block(torch.from_numpy(X)).numpy()


def _apply_mxnet(block, X: np.ndarray) -> np.ndarray:
    import mxnet as mx  # densenet_mxnet (loaded by the fixture) has restored numpy's aliases

    block.initialize(mx.init.Xavier())
    return block(mx.nd.array(X, dtype=np.float32)).asnumpy()


def _apply_jax(block, X: np.ndarray) -> np.ndarray:
    import jax

    variables = block.init(jax.random.PRNGKey(0), X)
    Y, _ = block.apply(variables, X, mutable=["batch_stats"])
    return np.asarray(Y)


def _apply_tf(block, X: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return block(tf.convert_to_tensor(X)).numpy()


APPLY_NATIVE: dict[str, Callable[[Any, np.ndarray], np.ndarray]] = {
    "torch": _apply_torch,
    "mxnet": _apply_mxnet,
    "jax": _apply_jax,
    "tf": _apply_tf,
}


def _counts_torch(model) -> tuple[int, int]:
    net = model.net
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    state = sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var")))
    return trainable, state


def _counts_mxnet(model) -> tuple[int, int]:
    params = list(model.net.collect_params().values())
    trainable = sum(p.data().size for p in params if p.grad_req != "null")
    state = sum(p.data().size for p in params if p.grad_req == "null")
    return trainable, state


def _counts_jax(model) -> tuple[int, int]:
    import jax

    def size(tree) -> int:
        return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))

    return size(model.variables["params"]), size(model.variables["batch_stats"])


def _counts_tf(model) -> tuple[int, int]:
    net = model.net
    return (
        sum(math.prod(w.shape) for w in net.trainable_weights),
        sum(math.prod(w.shape) for w in net.non_trainable_weights),
    )


def _call_torch(net, X: np.ndarray) -> Any:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(X))


def _call_mxnet(net, X: np.ndarray) -> Any:
    import mxnet as mx

    return net(mx.nd.array(X, dtype=np.float32))


def _call_jax(net, X: np.ndarray) -> Any:
    import jax

    return net.init(jax.random.PRNGKey(0), X)


def _call_tf(net, X: np.ndarray) -> Any:
    import tensorflow as tf

    return net(tf.convert_to_tensor(X), training=False)


# A freshly built network's first call, in its own layout (Flax: init).
CALL_NATIVE: dict[str, Callable[[Any, np.ndarray], Any]] = {
    "torch": _call_torch,
    "mxnet": _call_mxnet,
    "jax": _call_jax,
    "tf": _call_tf,
}


FRAMEWORK_COUNTS: dict[str, Callable[[Any], tuple[int, int]]] = {
    "torch": _counts_torch,
    "mxnet": _counts_mxnet,
    "jax": _counts_jax,
    "tf": _counts_tf,
}


# ---------------------------------------------------------------------------------------------
# The book's shape examples


def test_layout_is_the_frameworks(backend_name: str, adapter) -> None:
    assert adapter.name == backend_name
    assert adapter.layout == LAYOUT[backend_name]


def test_book_examples_native_api(backend_name: str, native, rng: np.random.Generator) -> None:
    """``DenseBlock(2, 10)`` on 4 images of 3x8x8 -> 23 channels; ``transition_block(10)`` -> 10 at 4x4."""
    apply = APPLY_NATIVE[backend_name]
    nchw = LAYOUT[backend_name] == "NCHW"
    X = images(rng, (4, 3, 8, 8) if nchw else (4, 8, 8, 3))

    Y = apply(native.DenseBlock(2, 10), X)
    assert Y.shape == ((4, 23, 8, 8) if nchw else (4, 8, 8, 23))
    # The block concatenates: its input comes first on the channel axis, untouched.
    np.testing.assert_array_equal(Y[:, :3] if nchw else Y[..., :3], X)
    assert np.all(np.isfinite(Y))

    Z = apply(native.transition_block(10), Y)
    assert Z.shape == ((4, 10, 4, 4) if nchw else (4, 4, 4, 10))
    assert np.all(np.isfinite(Z))


def test_book_examples_native_classes_and_conv_block(backend_name: str, native, rng) -> None:
    apply = APPLY_NATIVE[backend_name]
    nchw = LAYOUT[backend_name] == "NCHW"
    X = images(rng, (2, 5, 6, 6) if nchw else (2, 6, 6, 5))
    # A conv block returns only its new features; the dense block does the concatenating.
    assert apply(native.conv_block(7), X).shape == ((2, 7, 6, 6) if nchw else (2, 6, 6, 7))
    assert apply(native.TransitionBlock(3), X).shape == (2, 3, 3, 3)  # 3 channels at 3x3 either way
    assert isinstance(native.conv_block(7), native.ConvBlock)
    assert isinstance(native.transition_block(3), native.TransitionBlock)


def test_book_examples_through_adapter(adapter, rng: np.random.Generator) -> None:
    X = images(rng, (4, 3, 8, 8))
    Y = adapter.block("dense", X, 10, num_convs=2)
    assert Y.shape == (4, 23, 8, 8)
    np.testing.assert_array_equal(Y[:, :3], X)
    Z = adapter.block("transition", Y, 10)
    assert Z.shape == (4, 10, 4, 4)
    assert np.all(np.isfinite(Y)) and np.all(np.isfinite(Z))


def test_adapter_block_rejects_unknown_kind(adapter, rng) -> None:
    with pytest.raises(ValueError, match="dense"):
        adapter.block("bottleneck", images(rng, (1, 3, 8, 8)), 10)


# ---------------------------------------------------------------------------------------------
# The book's network through the adapter


def test_d2l_stages_match_plan(adapter, model_cache, rng: np.random.Generator) -> None:
    model = cached_model(model_cache, adapter, D2L)
    outs = adapter.stages(model, images(rng, (2, 1, 96, 96)))
    expected = plan(D2L, 96).shapes(2)
    assert list(outs) == list(expected)
    assert {k: v.shape for k, v in outs.items()} == expected
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in outs.values())


def test_d2l_counts(backend_name: str, adapter, model_cache) -> None:
    model = cached_model(model_cache, adapter, D2L)
    assert adapter.num_params(model) == 758_226
    assert adapter.num_state(model) == 6_608
    trainable, state = FRAMEWORK_COUNTS[backend_name](model)
    assert trainable == 758_226, "trainable parameters counted with the framework's own tools"
    assert state == 6_608, "running statistics counted with the framework's own tools"


# ---------------------------------------------------------------------------------------------
# Compiled path


def test_compiled_equals_eager(backend_name: str, adapter, rng: np.random.Generator) -> None:
    model = adapter.build(TINY, seed=0)
    X = images(rng, (2, 1, 32, 32))
    eager = adapter.forward(model, X, compiled=False)
    compiled = adapter.forward(model, X, compiled=True)
    again = adapter.forward(model, X, compiled=True)  # the cached compiled callable
    assert compiled.shape == eager.shape == (2, 10)
    atol = COMPILED_ATOL[backend_name]
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=atol)
    np.testing.assert_allclose(again, eager, rtol=0, atol=atol)
    # Eager after compiled still gives the same answer (no mode left switched on).
    np.testing.assert_array_equal(adapter.forward(model, X, compiled=False), eager)


# ---------------------------------------------------------------------------------------------
# Public names


def test_public_names(native) -> None:
    assert sorted(native.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert callable(getattr(native, name)), name


def test_for_config_keeps_the_whole_configuration(backend_name: str, native, rng: np.random.Generator) -> None:
    """``in_channels`` is not among the book's arguments; the network still has it and checks it."""
    config = CONFIGS["densenet121"]
    net = native.DenseNet.for_config(config)
    assert net.config == config
    assert net.config.in_channels == 3
    # Refused by the input check, before any layer runs (32x32 is above densenet121's 29x29).
    grey = images(rng, (1, 1, 32, 32) if LAYOUT[backend_name] == "NCHW" else (1, 32, 32, 1))
    with pytest.raises(InputError, match="built for 3-channel images, got 1 channels"):
        CALL_NATIVE[backend_name](net, grey)


def test_book_constructor_keeps_lr_for_the_books_trainer(native) -> None:
    net = native.DenseNet(num_channels=8, growth_rate=4, arch=(2, 2), lr=0.05)
    assert net.lr == 0.05  # the network itself never reads it
    assert net.config == TINY


# ---------------------------------------------------------------------------------------------
# Channel plan on other configurations


def test_non_default_config_matches_plan(adapter, model_cache, rng: np.random.Generator) -> None:
    model = cached_model(model_cache, adapter, OTHER)
    outs = adapter.stages(model, images(rng, (2, 3, 40, 36)))
    expected = plan(OTHER, (40, 36)).shapes(2)
    assert {k: v.shape for k, v in outs.items()} == expected
    assert expected["dense1"] == (2, 40, 10, 9)
    assert expected["head"] == (2, 5)
    assert adapter.num_params(model) == count_params(OTHER)
    assert adapter.num_state(model) == count_bn_stats(OTHER)


def test_channels_accumulate_across_blocks(adapter, model_cache, rng: np.random.Generator) -> None:
    # The book's JAX code restarts the count from num_channels in every pass; ours accumulates:
    # 16 +2*8 = 32 -> 16 +3*8 = 40 -> 20 +4*8 = 52.
    model = cached_model(model_cache, adapter, ACCUMULATE)
    outs = adapter.stages(model, images(rng, (2, 1, 32, 32)))
    channels = {k: v.shape[1] for k, v in outs.items()}
    expected = dict(plan_channels(ACCUMULATE))
    assert channels == expected
    assert [channels["transition1"], channels["transition2"]] == [16, 20]
    assert [channels["dense1"], channels["dense2"], channels["dense3"]] == [32, 40, 52]


# ---------------------------------------------------------------------------------------------
# Training


def _train_batch(rng: np.random.Generator, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return images(rng, (n, 1, 32, 32)), rng.integers(0, 10, size=n)


def test_sgd_step_updates_batchnorm_statistics(adapter, rng: np.random.Generator) -> None:
    """The book's TF trainer never trained Keras BatchNorm; every backend here must."""
    model = adapter.build(TRAIN, seed=0)
    X, y = _train_batch(rng)
    before = adapter.get_weights(model)
    adapter.forward(model, X)  # inference mode must not touch the statistics
    after_inference = adapter.get_weights(model)
    for k in before:
        np.testing.assert_array_equal(after_inference[k], before[k], err_msg=k)

    adapter.train_step(model, X, y, 0.1)
    after = adapter.get_weights(model)
    state = [k for k in before if is_state(k)]
    assert len(state) == 2 * (2 + sum(TRAIN.arch) + len(TRAIN.arch) - 1)
    unchanged = [k for k in state if np.max(np.abs(after[k] - before[k])) < 1e-6]
    assert not unchanged, f"running statistics not updated by a training step: {unchanged}"
    for k in state:
        if k.endswith("running_var"):
            assert np.all(after[k] > 0), k
    # The trainable tensors moved too.
    trainable_moved = [k for k in before if not is_state(k) and not np.array_equal(after[k], before[k])]
    assert "head.fc.weight" in trainable_moved and "stem.conv.weight" in trainable_moved


def test_loss_decreases_on_a_fixed_batch(adapter, rng: np.random.Generator) -> None:
    model = adapter.build(TRAIN, seed=0)
    X, y = _train_batch(rng)
    losses = [adapter.train_step(model, X, y, 0.1)[0] for _ in range(5)]
    assert all(np.isfinite(losses)), losses
    assert 1.0 < losses[0] < 4.0, losses  # near log(10) = 2.3 from a fresh network
    # Measured: each step lowers the loss; 5 steps take it to 0.58-0.70 of the first.
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("backend_name", backend_params(mxnet=[MXNET_ONEDNN_XFAIL]))
def test_gradients_with_growth_rate_4(adapter, rng: np.random.Generator) -> None:
    model = adapter.build(TINY, seed=0)
    X, y = _train_batch(rng)
    loss, dX, grads = adapter.loss_and_grads(model, X, y)
    assert np.isfinite(loss)
    assert dX.shape == X.shape and np.all(np.isfinite(dX))
    spec = canonical_spec(TINY)
    assert {k: g.shape for k, g in grads.items()} == {k: s for k, s in spec.items() if not is_state(k)}
    assert all(np.all(np.isfinite(g)) for g in grads.values())


# ---------------------------------------------------------------------------------------------
# Weights


def test_get_weights_is_the_canonical_spec(adapter, model_cache) -> None:
    for config in (TINY, OTHER):
        model = cached_model(model_cache, adapter, config)
        weights = adapter.get_weights(model)
        spec = canonical_spec(config)
        assert list(weights) == list(spec)
        assert {k: v.shape for k, v in weights.items()} == spec
        assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in weights.values())


def test_fresh_batchnorm_statistics(adapter, model_cache) -> None:
    weights = adapter.get_weights(cached_model(model_cache, adapter, TINY))
    for k, v in weights.items():
        if k.endswith("running_mean"):
            np.testing.assert_array_equal(v, 0, err_msg=k)
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            np.testing.assert_array_equal(v, 1, err_msg=k)
        elif k.endswith("bn.bias"):
            np.testing.assert_array_equal(v, 0, err_msg=k)


def test_set_get_round_trip_is_a_no_op(adapter, rng: np.random.Generator) -> None:
    model = adapter.build(TINY, seed=0)
    X = images(rng, (2, 1, 32, 32))
    before = adapter.forward(model, X)
    weights = adapter.get_weights(model)
    adapter.set_weights(model, weights)
    np.testing.assert_array_equal(adapter.forward(model, X), before)
    again = adapter.get_weights(model)
    for k in weights:
        np.testing.assert_array_equal(again[k], weights[k], err_msg=k)


def test_set_weights_loads_every_tensor(adapter, rng: np.random.Generator) -> None:
    model = adapter.build(TINY, seed=0)
    X = images(rng, (2, 1, 32, 32))
    before = adapter.forward(model, X)
    new = {
        k: (rng.uniform(0.5, 1.5, v.shape) if k.endswith("running_var") else rng.normal(0, 0.1, v.shape)).astype(
            np.float32
        )
        for k, v in adapter.get_weights(model).items()
    }
    adapter.set_weights(model, new)
    got = adapter.get_weights(model)
    for k in new:
        np.testing.assert_array_equal(got[k], new[k], err_msg=k)
    assert not np.allclose(adapter.forward(model, X), before)


@pytest.mark.torch
def test_torch_runs_channels_last_with_nchw_results(rng: np.random.Generator, request) -> None:
    """The PyTorch adapter keeps its 4-D tensors channels-last (faster oneDNN kernels); the shapes,
    weights and float64 results are those of the book's NCHW network."""
    import torch

    adapter = get_adapter("torch", request.config)
    X, y = images(rng, (3, 1, 32, 32)).astype(np.float64), np.array([1, 4, 7])
    fast = adapter.build(TINY, seed=0, dtype="float64")
    book = adapter.build(TINY, seed=0, dtype="float64")
    adapter.set_memory_format(book, torch.contiguous_format)
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert adapter.prepare(fast, X).is_contiguous(memory_format=torch.channels_last)
    assert tuple(adapter.prepare(fast, X).shape) == X.shape
    loss_fast, dX_fast, grads_fast = adapter.loss_and_grads(fast, X, y)
    loss_book, dX_book, grads_book = adapter.loss_and_grads(book, X, y)
    assert abs(loss_fast - loss_book) <= 1e-12
    np.testing.assert_allclose(dX_fast, dX_book, rtol=0, atol=1e-12)
    for k, g in grads_book.items():
        np.testing.assert_allclose(grads_fast[k], g, rtol=0, atol=1e-12 * max(1.0, np.abs(g).max()), err_msg=k)
    for model in (fast, book):
        adapter.train_step(model, X, y, 0.1)
    for k, w in adapter.get_weights(book).items():
        np.testing.assert_allclose(adapter.get_weights(fast)[k], w, rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.jax
def test_jax_batch_norm_sums_as_products_equal_flax(rng: np.random.Generator, request) -> None:
    """In training, the JAX adapter computes Flax's BatchNorm with its sums as matrix products
    (faster on XLA:CPU): the same loss, gradients and running statistics as Flax's own, float64,
    for the book's network and a DenseNet-BC one; and the products really are what runs."""
    import jax

    import densenet_jax.adapter as jax_adapter

    adapter = get_adapter("jax", request.config)
    X, y = images(rng, (3, 1, 32, 32)).astype(np.float64), np.array([1, 4, 7])
    bc = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2), bn_size=2, compression=0.5)
    for config in (TINY, bc):
        results = {}
        for products in (True, False):
            jax_adapter._stats_as_products = products
            try:
                jax.clear_caches()  # the jitted steps were traced with the other setting
                model = adapter.build(config, seed=0, dtype="float64")
                loss, dX, grads = adapter.loss_and_grads(model, X, y)
                adapter.train_step(model, X, y, 0.1)
                results[products] = (loss, dX, grads, adapter.get_weights(model))
            finally:
                jax_adapter._stats_as_products = True
                jax.clear_caches()
        (loss, dX, grads, weights), (loss0, dX0, grads0, weights0) = results[True], results[False]
        assert abs(loss - loss0) <= 1e-12
        np.testing.assert_allclose(dX, dX0, rtol=0, atol=1e-12)
        for k, g in grads0.items():
            np.testing.assert_allclose(grads[k], g, rtol=0, atol=1e-12 * max(1.0, np.abs(g).max()), err_msg=k)
        for k, w in weights0.items():  # running statistics included
            np.testing.assert_allclose(weights[k], w, rtol=0, atol=1e-12 * max(1.0, np.abs(w).max()), err_msg=k)
    # What runs: one custom-gradient BatchNorm per BatchNorm layer of the training program.
    model = adapter.build(TINY, seed=0)
    v = model.variables
    unbias = adapter._unbias_tree(model, X.shape)
    rest = (v["batch_stats"], adapter.prepare(model, X.astype(np.float32)), y, jax.random.PRNGKey(0), unbias)
    net = model.net.clone(training=True)
    program = str(jax.make_jaxpr(lambda p: jax_adapter._loss(net, p, *rest)[0])(v["params"]))
    layers = sum(1 for kind, _ in adapter._layers(model) if kind == "bn")
    assert program.count("custom_vjp_call") == layers > 0
