"""Bad inputs, bad weights, bad configurations and bad backend names: every one must raise this
package's own error with a message that names what was expected and what was given, never a
NaN, an empty array or only a framework traceback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from common.arch import canonical_spec
from common.config import D2L, DenseNetConfig
from common.errors import BackendError, ConfigError, InputError, WeightFileError
from common.registry import ALIASES, BACKENDS, canonical_name, load_backend
from tests.helpers import cached_model, images

TINY = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))  # smallest image: 5x5
TINY_KWARGS = {"num_channels": 8, "growth_rate": 4, "arch": (2, 2)}
NHWC = {"jax", "tf"}


def input_error(call: Callable[[], Any]) -> str:
    """The message of the InputError ``call`` raises (an InputError is a ValueError)."""
    with pytest.raises(InputError) as info:
        call()
    assert isinstance(info.value, ValueError)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Through the adapter

# name -> (configuration, NCHW batch maker, fragments the message must contain)
ADAPTER_CASES: dict[str, tuple[DenseNetConfig, Callable[[np.random.Generator], np.ndarray], list[str]]] = {
    "rank3": (TINY, lambda r: images(r, (1, 32, 32)), ["rank-4", "(N, C, H, W)", "rank 3", "(1, 32, 32)"]),
    "rank5": (TINY, lambda r: images(r, (1, 1, 1, 32, 32)), ["rank-4", "rank 5"]),
    "channels": (TINY, lambda r: images(r, (2, 3, 32, 32)), ["1-channel", "got 3 channels"]),
    "too_small_d2l": (D2L, lambda r: images(r, (2, 1, 28, 28)), ["29x29", "got 28x28"]),
    "too_small_one_side": (D2L, lambda r: images(r, (2, 1, 96, 28)), ["29x29", "got 96x28"]),
    "int32": (TINY, lambda r: r.integers(0, 255, (2, 1, 32, 32)).astype(np.int32), ["float", "int32"]),
    "uint8": (TINY, lambda r: r.integers(0, 255, (2, 1, 32, 32)).astype(np.uint8), ["float", "uint8"]),
    "bool": (TINY, lambda r: np.ones((2, 1, 32, 32), dtype=bool), ["float", "bool"]),
    "empty_batch": (TINY, lambda r: images(r, (0, 1, 32, 32)), ["empty batch", "(0, 1, 32, 32)"]),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_adapter_refuses_bad_images(adapter, model_cache, rng: np.random.Generator, case: str) -> None:
    config, make, fragments = ADAPTER_CASES[case]
    model = cached_model(model_cache, adapter, config)
    X = make(rng)
    y = np.zeros(len(X), dtype=np.int64)
    entry_points = {
        "forward": lambda: adapter.forward(model, X),
        "compiled": lambda: adapter.forward(model, X, compiled=True),
        "stages": lambda: adapter.stages(model, X),
        "loss_and_grads": lambda: adapter.loss_and_grads(model, X, y),
    }
    for entry, call in entry_points.items():
        message = input_error(call)
        for fragment in fragments:
            assert fragment in message, f"{entry}: {fragment!r} not in {message!r}"


def test_too_small_message_states_this_networks_downsampling(adapter, model_cache, rng) -> None:
    model = cached_model(model_cache, adapter, TINY)
    message = input_error(lambda: adapter.forward(model, images(rng, (1, 1, 4, 4))))
    assert "5x5" in message and "got 4x4" in message
    assert "32x" not in message


def test_adapter_block_refuses_images_too_small_to_pool(adapter, rng: np.random.Generator) -> None:
    message = input_error(lambda: adapter.block("transition", images(rng, (2, 3, 1, 6)), 4))
    assert "1x6" in message


def test_adapter_block_refuses_bad_images(adapter, rng: np.random.Generator) -> None:
    assert "rank 3" in input_error(lambda: adapter.block("dense", images(rng, (3, 8, 8)), 10, num_convs=2))
    message = input_error(lambda: adapter.block("dense", np.ones((4, 3, 8, 8), np.int64), 10, num_convs=2))
    assert "int64" in message


def test_refused_training_step_changes_nothing(adapter, rng: np.random.Generator) -> None:
    model = adapter.build(TINY, seed=0)
    X = images(rng, (2, 1, 32, 32))
    before = adapter.get_weights(model)
    logits = adapter.forward(model, X)
    with pytest.raises(InputError):
        adapter.train_step(model, images(rng, (2, 3, 32, 32)), np.zeros(2, np.int64), 0.1)
    after = adapter.get_weights(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    np.testing.assert_array_equal(adapter.forward(model, X), logits)


# ---------------------------------------------------------------------------------------------
# Bad weights through the adapter


def test_set_weights_lists_every_problem_and_loads_nothing(adapter, rng: np.random.Generator) -> None:
    model = adapter.build(TINY, seed=0)
    X = images(rng, (2, 1, 32, 32))
    logits = adapter.forward(model, X)
    good = adapter.get_weights(model)

    bad = {k: v.copy() for k, v in good.items()}
    # A correct tensor with new values: loaded, it would change the output.
    bad["stem.conv.weight"] = bad["stem.conv.weight"] + 1.0
    del bad["dense1.conv2.conv.bias"]  # missing
    del bad["head.bn.running_var"]  # missing
    bad["dense3.conv1.conv.weight"] = np.zeros((4, 16, 3, 3), np.float32)  # unexpected
    bad["head.fc.weight"] = np.zeros((16, 10), np.float32)  # transposed: mis-shaped
    bad["transition1.conv.weight"] = np.zeros((8, 16), np.float32)  # mis-shaped (rank)

    with pytest.raises(WeightFileError) as info:
        adapter.set_weights(model, bad)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for fragment in [
        "missing 2 tensor(s)",
        "dense1.conv2.conv.bias",
        "head.bn.running_var",
        "unexpected 1 tensor(s)",
        "dense3.conv1.conv.weight",
        "head.fc.weight: expected shape (10, 16), got (16, 10)",
        "transition1.conv.weight: expected shape (8, 16, 1, 1), got (8, 16)",
    ]:
        assert fragment in message, f"{fragment!r} not in {message!r}"

    np.testing.assert_array_equal(adapter.forward(model, X), logits)
    after = adapter.get_weights(model)
    for k in good:
        np.testing.assert_array_equal(after[k], good[k], err_msg=k)


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "integer", "nan"])
def test_set_weights_single_problem(adapter, model_cache, rng, problem: str) -> None:
    model = cached_model(model_cache, adapter, TINY)
    X = images(rng, (2, 1, 32, 32))
    logits = adapter.forward(model, X)
    weights = adapter.get_weights(model)
    weights["stem.conv.bias"] = weights["stem.conv.bias"] + 1.0  # would change the output
    if problem == "missing":
        del weights["head.fc.bias"]
        expected = "missing 1 tensor(s): head.fc.bias"
    elif problem == "extra":
        weights["head.fc2.weight"] = np.zeros((10, 10), np.float32)
        expected = "unexpected 1 tensor(s): head.fc2.weight"
    elif problem == "shape":
        weights["dense2.conv1.bn.weight"] = np.ones(9, np.float32)
        expected = "dense2.conv1.bn.weight: expected shape (8,), got (9,)"
    elif problem == "integer":
        weights["head.fc.bias"] = np.zeros(10, np.int32)
        expected = "head.fc.bias: expected floating-point values, got int32"
    else:
        weights["stem.bn.running_var"][0] = np.nan
        expected = "stem.bn.running_var: contains NaN"
    with pytest.raises(WeightFileError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        adapter.set_weights(model, weights)
    np.testing.assert_array_equal(adapter.forward(model, X), logits)


def test_set_weights_of_another_configuration(adapter, model_cache) -> None:
    model = cached_model(model_cache, adapter, TINY)
    other = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2), num_classes=7)
    weights = {k: np.zeros(s, np.float32) for k, s in canonical_spec(other).items()}
    with pytest.raises(WeightFileError) as info:
        adapter.set_weights(model, weights)
    assert "head.fc.weight: expected shape (10, 16), got (7, 16)" in str(info.value)
    assert "head.fc.bias: expected shape (10,), got (7,)" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Through each backend's own DenseNet, in its own layout


def _native_torch(native) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    net = native.DenseNet(**TINY_KWARGS)
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 1, 32, 32))

    def run(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(X)).numpy()

    return run


def _native_mxnet(native) -> Callable[[np.ndarray], np.ndarray]:
    import mxnet as mx  # densenet_mxnet (loaded by the fixture) has restored numpy's aliases

    net = native.DenseNet(**TINY_KWARGS)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 32, 32)))
    return lambda X: net(mx.nd.array(X, dtype=X.dtype)).asnumpy()


def _native_jax(native) -> Callable[[np.ndarray], np.ndarray]:
    import jax
    import jax.numpy as jnp

    net = native.DenseNet(**TINY_KWARGS, training=False)
    variables = jax.jit(net.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
    return lambda X: np.asarray(net.apply(variables, jnp.asarray(X)))


def _native_tf(native) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    net = native.DenseNet(**TINY_KWARGS)
    net(tf.zeros((1, 32, 32, 1)), training=False)
    return lambda X: net(tf.convert_to_tensor(X), training=False).numpy()


BUILD_NATIVE: dict[str, Callable[[Any], Callable[[np.ndarray], np.ndarray]]] = {
    "torch": _native_torch,
    "mxnet": _native_mxnet,
    "jax": _native_jax,
    "tf": _native_tf,
}


def _own_layout(backend_name: str, X: np.ndarray) -> np.ndarray:
    """An NCHW batch in the backend's layout (arrays of another rank pass through)."""
    if backend_name in NHWC and X.ndim == 4:
        return np.ascontiguousarray(X.transpose(0, 2, 3, 1))
    return X


def test_native_densenet_refuses_bad_images(backend_name: str, native, rng: np.random.Generator) -> None:
    run = BUILD_NATIVE[backend_name](native)
    layout = "NHWC" if backend_name in NHWC else "NCHW"
    good = _own_layout(backend_name, images(rng, (2, 1, 32, 32)))
    logits = run(good)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))

    cases = {
        "rank": (images(rng, (1, 32, 32)), ["rank-4", layout, "rank 3"]),
        "channels": (_own_layout(backend_name, images(rng, (2, 3, 32, 32))), ["1-channel", "got 3 channels"]),
        "too small": (_own_layout(backend_name, images(rng, (2, 1, 4, 4))), ["5x5", "got 4x4"]),
        "one side too small": (_own_layout(backend_name, images(rng, (2, 1, 32, 4))), ["5x5", "got 32x4"]),
        "dtype": (_own_layout(backend_name, np.ones((2, 1, 32, 32), np.int32)), ["float", "int32"]),
        "empty": (_own_layout(backend_name, images(rng, (0, 1, 32, 32))), ["empty batch"]),
    }
    for case, (X, fragments) in cases.items():
        message = input_error(lambda X=X: run(X))
        for fragment in fragments:
            assert fragment in message, f"{case}: {fragment!r} not in {message!r}"

    # Refusing bad batches left the network as it was.
    np.testing.assert_array_equal(run(good), logits)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arch": ()}, "arch"),
        ({"arch": (2, 0)}, r"arch\[1\]"),
        ({"arch": (2, -1, 2)}, r"arch\[1\]"),
        ({"growth_rate": 0}, "growth_rate"),
        ({"growth_rate": 2.5}, "growth_rate"),
        ({"num_channels": -1}, "num_channels"),
        ({"num_channels": True}, "num_channels"),
        ({"num_classes": 0}, "num_classes"),
    ],
    ids=lambda v: str(v).replace(" ", "") if isinstance(v, dict) else None,
)
def test_native_densenet_refuses_bad_configuration(native, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        native.DenseNet(**kwargs)


# ---------------------------------------------------------------------------------------------
# Backend names


@pytest.mark.parametrize("name", ["nope", "", "torch2", "numpy"])
def test_unknown_backend_lists_the_valid_names(name: str) -> None:
    with pytest.raises(BackendError) as info:
        load_backend(name)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert repr(name) in message
    for valid in ("torch", "mxnet", "jax", "tf"):
        assert valid in message
    for alias in ("pytorch", "tensorflow", "flax", "gluon"):
        assert alias in message


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("pytorch", "torch"),
        ("tensorflow", "tf"),
        ("keras", "tf"),
        ("flax", "jax"),
        ("gluon", "mxnet"),
        ("PyTorch", "torch"),
        (" TensorFlow ", "tf"),
        ("MXNet", "mxnet"),
    ],
)
def test_alias_names_resolve(alias: str, name: str) -> None:
    assert canonical_name(alias) == name


def test_aliases_load_the_same_adapter(backend_name: str, adapter) -> None:
    aliases = [a for a, n in ALIASES.items() if n == backend_name]
    assert aliases, f"no alias for {backend_name}"
    for alias in aliases:
        assert load_backend(alias) is adapter
    assert load_backend(backend_name.upper()) is adapter
    assert set(BACKENDS) == {"torch", "mxnet", "jax", "tf"}


def test_native_densenet_raises_the_checks_message_as_it_is(
    backend_name: str, native, rng: np.random.Generator
) -> None:
    """No framework wraps it: Keras would otherwise re-raise it as "Exception encountered when
    calling DenseNet.call()" with terminal escape codes and the call's arguments."""
    run = BUILD_NATIVE[backend_name](native)
    message = input_error(lambda: run(_own_layout(backend_name, images(rng, (2, 1, 4, 4)))))
    assert message == (
        "DenseNet needs images of at least 5x5, got 4x4; resize the input, e.g. Fashion-MNIST's 28x28 to 96x96"
    )
