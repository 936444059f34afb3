"""The MXNet blocks in both of MXNet's array modes: the book's numpy mode (``npx.set_np()``,
``mxnet.np`` arrays) and legacy ``nd`` mode, hybridized or not; and the import order."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError
from tests.helpers import get_adapter

pytestmark = pytest.mark.mxnet

ROOT = Path(__file__).parents[1]
TINY_KWARGS = {"num_channels": 8, "growth_rate": 4, "arch": (2, 2)}
# Wide enough for MXNet's oneDNN backward (README, known issues: growth rate 4 fails there).
SMALL_KWARGS = {"num_channels": 16, "growth_rate": 16, "arch": (2, 2)}


@pytest.fixture(params=["numpy", "legacy"])
def mode(request: pytest.FixtureRequest):
    """``"numpy"`` inside ``npx.set_np()`` (reset afterwards), or ``"legacy"``."""
    get_adapter("mxnet", request.config)  # skips, or fails when required, if MXNet cannot load
    from mxnet import npx

    if request.param == "numpy":
        npx.set_np()
    try:
        yield request.param
    finally:
        npx.reset_np()


def array(mode: str, X: np.ndarray):
    import mxnet as mx

    return mx.np.array(X, dtype=X.dtype) if mode == "numpy" else mx.nd.array(X, dtype=X.dtype)


@pytest.mark.parametrize("hybridize", [False, True], ids=["eager", "hybridized"])
def test_the_books_shapes_in_both_modes(mode: str, hybridize: bool) -> None:
    import mxnet as mx

    from densenet_mxnet import DenseBlock, DenseNet, conv_block, transition_block

    def built(block):
        block.initialize(mx.init.Xavier())
        if hybridize:
            block.hybridize()
        return block

    expected_type = mx.np.ndarray if mode == "numpy" else mx.nd.NDArray
    X = array(mode, np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32))
    new = built(conv_block(10))(X)
    Y = built(DenseBlock(2, 10))(X)
    Z = built(transition_block(10))(Y)
    assert [type(a) for a in (new, Y, Z)] == [expected_type] * 3
    assert (new.shape, Y.shape, Z.shape) == ((4, 10, 8, 8), (4, 23, 8, 8), (4, 10, 4, 4))
    net = DenseNet()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    logits = net(array(mode, np.random.default_rng(1).random((2, 1, 96, 96), dtype=np.float32)))
    assert isinstance(logits, expected_type) and logits.shape == (2, 10)


def _run_tiny(mode: str, hybridize: bool, values: list[np.ndarray] | None, X: np.ndarray):
    """A tiny DenseNet in ``mode``; its parameters set to ``values`` (in order) when given."""
    import mxnet as mx

    from densenet_mxnet import DenseNet

    mx.random.seed(0)
    net = DenseNet(**TINY_KWARGS)
    net.initialize(mx.init.Xavier())
    net(array(mode, X))  # finishes the deferred initialisation
    params = list(net.collect_params().values())
    if values is not None:
        for p, v in zip(params, values, strict=True):
            p.set_data(array(mode, v))
    if hybridize:
        net.hybridize()
    return net(array(mode, X)).asnumpy(), [p.data().asnumpy() for p in params]


def test_both_modes_compute_the_same_function() -> None:
    from mxnet import npx

    X = np.random.default_rng(2).random((3, 1, 32, 32), dtype=np.float32)
    legacy, values = _run_tiny("legacy", False, None, X)
    npx.set_np()
    try:
        for hybridize in (False, True):
            numpy_mode, _ = _run_tiny("numpy", hybridize, values, X)
            np.testing.assert_allclose(numpy_mode, legacy, rtol=1e-5, atol=1e-6)
    finally:
        npx.reset_np()


def test_the_books_training_step_in_numpy_mode(mode: str) -> None:
    import mxnet as mx
    from mxnet import autograd, gluon

    from densenet_mxnet import DenseNet

    net = DenseNet(**SMALL_KWARGS)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    rng = np.random.default_rng(3)
    X = array(mode, rng.random((8, 1, 32, 32), dtype=np.float32))
    y = array(mode, rng.integers(0, 10, 8).astype(np.float32))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    for _ in range(3):
        with autograd.record():
            loss = loss_fn(net(X), y).mean()
        loss.backward()
        trainer.step(1)
        losses.append(float(loss.item() if mode == "numpy" else loss.asscalar()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("initialised", [False, True])
def test_too_small_input_names_the_size_in_both_modes(mode: str, initialised: bool) -> None:
    import mxnet as mx

    from densenet_mxnet import DenseNet

    net = DenseNet()
    if initialised:
        net.initialize(mx.init.Xavier())
    with pytest.raises(InputError) as info:
        net(array(mode, np.zeros((1, 1, 28, 28), np.float32)))
    assert str(info.value).startswith("DenseNet needs images of at least 29x29, got 28x28")


def test_densenet_mxnet_is_usable_after_a_failed_import_of_mxnet(request: pytest.FixtureRequest) -> None:
    """MXNet 1.9.1 alone fails to import beside numpy >= 1.24 (numpy.bool); importing densenet_mxnet
    first avoids that, and importing it after MXNet failed still works."""
    get_adapter("mxnet", request.config)
    code = (
        "try:\n"
        "    import mxnet\n"
        "    print('mxnet imported on its own')\n"
        "except AttributeError as exc:\n"
        "    print('mxnet alone failed:', exc.args[0].splitlines()[0])\n"
        "import densenet_mxnet\n"
        "from mxnet import np, npx\n"
        "npx.set_np()\n"
        "net = densenet_mxnet.DenseNet(num_channels=8, growth_rate=4, arch=(2, 2))\n"
        "net.initialize()\n"
        "print(net(np.zeros((1, 1, 32, 32))).shape)\n"
        "npx.reset_np()\n"
        "import mxnet as mx\n"
        "net = densenet_mxnet.DenseNet(num_channels=8, growth_rate=4, arch=(2, 2))\n"
        "net.initialize()\n"
        "net.hybridize()\n"
        "print(net(mx.nd.zeros((1, 1, 32, 32))).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "mxnet alone failed: module 'numpy' has no attribute 'bool'.",
        "(1, 10)",
        "(1, 10)",
    ]


def _readme_mxnet_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"# MXNet Gluon.*?(?=\n# JAX)", text, re.S)
    assert block, "README.md has no MXNet example"
    return block.group(0)


def test_readme_imports_densenet_mxnet_before_mxnet() -> None:
    lines = _readme_mxnet_example().splitlines()
    first_mxnet = next(i for i, line in enumerate(lines) if re.match(r"\s*(import mxnet|from mxnet )", line))
    assert any(re.match(r"\s*(import|from) densenet_mxnet", line) for line in lines[:first_mxnet])


def test_readme_mxnet_example_runs(request: pytest.FixtureRequest) -> None:
    """The README's MXNet example is the book's numpy mode, and it runs as printed."""
    get_adapter("mxnet", request.config)
    example = _readme_mxnet_example()
    assert "npx.set_np()" in example and "from mxnet import" in example
    code = example + "\nassert logits.shape == (2, 10), logits.shape\nprint('ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
