"""``densenet convert --from-format onnx``: an ONNX DenseNet's initialisers read into canonical weights
(common.deploy.onnx_import).

Graphs come from PyTorch's exporter (our torch backend and torchvision's densenet121, each exported
once per module) and from ``onnx.helper`` (a DenseNet written node by node from canonical weights,
in the forms other exporters use: Gemm with transB=0, MatMul + Add, Constant and Identity nodes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.arch import walk
from common.config import BN_EPS, DenseNetConfig, named_config
from common.errors import WeightFileError
from common.weights import peers
from common.weights.canonical import init_canonical, load_canonical
from tests.helpers import get_adapter, run_cli, torchvision_densenet

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402  (after the skip: onnx is optional)

from common.deploy.onnx_import import read_onnx  # noqa: E402

PLAIN = DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2))
BC = DenseNetConfig(
    num_channels=16,
    growth_rate=8,
    arch=(2, 3),
    num_classes=5,
    in_channels=3,
    bn_size=4,
    compression=0.5,
    conv_bias=False,
)


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Same names in the same order, every tensor float32 and bit for bit the same."""
    return list(a) == list(b) and all(
        b[k].dtype == np.float32 and np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a
    )


# ------------------------------------------------------------------------------------------------
# A DenseNet written with onnx.helper


def _node(op: str, inputs: list[str], output: str, **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=f"n_{output}", **attrs)


def _helper_densenet(
    config: DenseNetConfig, weights: dict[str, np.ndarray], classifier: str = "gemm", opset: int = 18
) -> onnx.ModelProto:
    """``config``'s forward pass as ONNX nodes, its tensors as initializers named t0, t1, ...;
    ``classifier``: ``gemm`` (transB=1), ``gemm_t`` (transB=0) or ``matmul`` (MatMul + Add)."""
    nodes, inits, x, block_in, dense_layer = [], [], "x", "x", ""

    def const(value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), f"t{len(inits)}"))
        return inits[-1].name

    for layer in walk(config):
        name, kind = layer.name, layer.kind
        if name.startswith("dense") and not name.startswith(dense_layer + "."):
            dense_layer, block_in = ".".join(name.split(".")[:2]), x  # a dense layer's input, for its Concat
        geometry = {"kernel_shape": [layer.kernel] * 2, "strides": [layer.stride] * 2, "pads": [layer.padding] * 4}
        if kind == "conv":
            inputs = [x, const(weights[f"{name}.weight"])]
            inputs += [const(weights[f"{name}.bias"])] if config.conv_bias else []
            nodes.append(_node("Conv", inputs, name, **geometry))
        elif kind == "bn":
            stats = [const(weights[f"{name}.{leaf}"]) for leaf in ("weight", "bias", "running_mean", "running_var")]
            nodes.append(_node("BatchNormalization", [x, *stats], name, epsilon=BN_EPS))
        elif kind in ("relu", "maxpool", "avgpool"):
            op = {"relu": "Relu", "maxpool": "MaxPool", "avgpool": "AveragePool"}[kind]
            nodes.append(_node(op, [x], name, **({} if kind == "relu" else geometry)))
        elif kind == "concat":
            nodes.append(_node("Concat", [block_in, x], name, axis=1))
        elif kind == "globalpool":
            nodes += [_node("GlobalAveragePool", [x], name + "_4d"), _node("Flatten", [name + "_4d"], name)]
        elif kind == "fc":
            w, b = weights[f"{name}.weight"], weights[f"{name}.bias"]
            if classifier == "matmul":
                nodes += [_node("MatMul", [x, const(w.T)], "mm"), _node("Add", [const(b), "mm"], name)]
            else:
                gemm_t = classifier == "gemm_t"
                inputs = [x, const(w.T if gemm_t else w), const(b)]
                nodes.append(_node("Gemm", inputs, name, transB=0 if gemm_t else 1))
        x = name if kind != "dropout" else x
    graph = helper.make_graph(
        nodes,
        "densenet",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", config.in_channels, 32, 32])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", config.num_classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _read_error(path: Path) -> str:
    with pytest.raises(WeightFileError) as info:
        read_onnx(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("classifier", ["gemm", "gemm_t", "matmul"])
@pytest.mark.parametrize("config", [PLAIN, BC, BC.replace(arch=(1, 2, 1), compression=0.3)], ids=["plain", "bc", "c03"])
def test_helper_graph_round_trip(tmp_path: Path, config: DenseNetConfig, classifier: str) -> None:
    weights = init_canonical(config, 1)
    found, got, metadata = read_onnx(_save(_helper_densenet(config, weights, classifier), tmp_path / "m.onnx"))
    assert found == config
    assert _equal(weights, got)
    assert metadata["source"] == "onnx (test)" and metadata["running_var"] == "unbiased"
    assert metadata["running_var_basis"].startswith("assumed")


def test_constant_and_identity_initializers(tmp_path: Path) -> None:
    """Weights reached through Constant and Identity nodes, as some exporters write them."""
    weights = init_canonical(BC, 2)
    model = _helper_densenet(BC, weights)
    graph = model.graph
    inits = list(graph.initializer)
    del graph.initializer[:]
    extra = []
    for i, tensor in enumerate(inits):
        if i % 3 == 0:
            graph.initializer.append(tensor)
        elif i % 3 == 1:
            extra.append(helper.make_node("Constant", [], [tensor.name], value=tensor))
        else:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name + "_src"))
            extra.append(helper.make_node("Identity", [tensor.name + "_src"], [tensor.name]))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*extra, *nodes])
    found, got, _ = read_onnx(_save(model, tmp_path / "m.onnx"))
    assert found == BC and _equal(weights, got)


def test_running_var_metadata(tmp_path: Path) -> None:
    model = _helper_densenet(PLAIN, init_canonical(PLAIN, 0))
    model.producer_name, model.producer_version = "MXNet", "1.9.1"
    metadata = read_onnx(_save(model, tmp_path / "mx.onnx"))[2]
    assert metadata["running_var"] == "biased" and metadata["source"] == "onnx (MXNet 1.9.1)"
    helper.set_model_props(model, {"densenet.running_var": "unbiased"})
    assert read_onnx(_save(model, tmp_path / "stated.onnx"))[2]["running_var"] == "unbiased"
    helper.set_model_props(model, {"densenet.running_var": "n/(n-1)"})
    assert "densenet.running_var is 'n/(n-1)'" in _read_error(_save(model, tmp_path / "bad.onnx"))


def test_importing_reads_no_framework() -> None:
    code = "import sys, common.deploy.onnx_import, common.cli.weights; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------------
# Graphs this reader refuses, one line each


def test_not_an_onnx_file(tmp_path: Path) -> None:
    (tmp_path / "text.onnx").write_text("this is not a protobuf, it is a sentence\n" * 20)
    assert "not an ONNX model" in _read_error(tmp_path / "text.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "not an ONNX model" in _read_error(tmp_path / "empty.onnx")
    assert "no such file" in _read_error(tmp_path / "missing.onnx")


@pytest.mark.parametrize("opset", [5, 99])
def test_unsupported_opset(tmp_path: Path, opset: int) -> None:
    model = _helper_densenet(PLAIN, init_canonical(PLAIN, 0), opset=opset)
    message = _read_error(_save(model, tmp_path / "m.onnx"))
    assert f"opset {opset} is not supported; this reader takes opsets 9 to {onnx.defs.onnx_opset_version()}" in message


def test_not_a_densenet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = lambda *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32))  # noqa: E731

    def model(nodes: list, inits: dict) -> onnx.ModelProto:
        tensors = [numpy_helper.from_array(numpy_helper.to_array(t), name) for name, t in inits.items()]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
            tensors,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    mlp = model([_node("Gemm", ["x", "w", "b"], "y", transB=1), _node("Relu", ["y"], "z")], {"w": w(4, 8), "b": w(4)})
    assert "not a DenseNet: the graph has no Conv nodes (it has Gemm, Relu)" in _read_error(
        _save(mlp, tmp_path / "mlp.onnx")
    )
    bn = {f"s{leaf}": w(16) for leaf in "abcd"}
    bn2 = {f"t{leaf}": w(16) for leaf in "abcd"}
    resnet = model(
        [
            _node("Conv", ["x", "stem"], "c1", kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3]),
            _node("BatchNormalization", ["c1", *bn], "b1"),
            _node("Relu", ["b1"], "r1"),
            _node("Conv", ["r1", "c3"], "c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            _node("BatchNormalization", ["c2", *bn2], "b2"),
            _node("Add", ["b2", "r1"], "y"),
        ],
        {"stem": w(16, 3, 7, 7), **bn, "c3": w(16, 16, 3, 3), **bn2},
    )
    message = _read_error(_save(resnet, tmp_path / "resnet.onnx"))
    assert "not a DenseNet" in message and "layer 3 (Conv 'n_c2') is a 3x3 conv with 16 inputs" in message
    assert "expected a BatchNorm" in message
    no_stem = model(
        [_node("Conv", ["x", "k"], "c", kernel_shape=[3, 3]), _node("BatchNormalization", ["c", *bn], "y")],
        {"k": w(16, 3, 3, 3), **bn},
    )
    assert "expected the 7x7 stem convolution first" in _read_error(_save(no_stem, tmp_path / "no_stem.onnx"))


def test_dense_layer_of_the_wrong_width(tmp_path: Path) -> None:
    """A 3x3 conv that does not take the concatenation of every earlier feature map."""
    weights = init_canonical(PLAIN, 0)
    weights["dense1.conv2.conv.weight"] = weights["dense1.conv2.conv.weight"][:, :16]
    weights["dense1.conv2.bn.weight"] = weights["dense1.conv2.bn.weight"][:16]
    for leaf in ("bias", "running_mean", "running_var"):
        weights[f"dense1.conv2.bn.{leaf}"] = weights[f"dense1.conv2.bn.{leaf}"][:16]
    message = _read_error(_save(_helper_densenet(PLAIN, weights), tmp_path / "m.onnx"))
    assert "layer 5 (BatchNormalization 'n_dense1.conv2.bn') is a BatchNorm over 16 channels" in message
    assert "here takes 32" in message


def test_batchnorm_epsilon_must_be_canonical(tmp_path: Path) -> None:
    model = _helper_densenet(PLAIN, init_canonical(PLAIN, 0))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute[0].f = 1.001e-5
    assert "BatchNorm epsilon 1.001e-05; the canonical networks use 1e-05" in _read_error(
        _save(model, tmp_path / "m.onnx")
    )


def test_folded_batchnorms(tmp_path: Path) -> None:
    """tf2onnx writes every BatchNorm as Mul + Add (or into the conv): no statistics to read."""
    model = _helper_densenet(PLAIN, init_canonical(PLAIN, 0))
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            scale, shift = node.input[1], node.input[2]
            nodes.append(_node("Mul", [node.input[0], scale], node.output[0] + "_mul"))
            nodes.append(_node("Add", [node.output[0] + "_mul", shift], node.output[0]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    message = _read_error(_save(model, tmp_path / "m.onnx"))
    assert "no BatchNormalization" in message and "running statistics cannot be recovered" in message
    assert "export from PyTorch or MXNet, or convert the framework's own weight file instead" in message


# ------------------------------------------------------------------------------------------------
# PyTorch's exporter: our torch backend and torchvision's densenet121


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """``export(config, optimize=False)``: our torch network with ``init_canonical(config, 0)``,
    exported by ``torch.onnx.export`` (dynamo, opset 18) once per module."""
    adapter = get_adapter("torch", request.config)
    import torch

    cache: dict[tuple[DenseNetConfig, bool], Path] = {}

    def export(config: DenseNetConfig, optimize: bool = False) -> Path:
        if (config, optimize) not in cache:
            model = adapter.build(config, seed=0)
            adapter.set_weights(model, init_canonical(config, 0))
            path = tmp_path_factory.mktemp("onnx") / "model.onnx"
            torch.manual_seed(0)
            example = (torch.zeros(2, config.in_channels, 32, 32),)
            with torch.no_grad():
                torch.onnx.export(
                    model.net.eval(),
                    example,
                    str(path),
                    dynamo=True,
                    opset_version=18,
                    dynamic_shapes=({0: "batch"},),
                    optimize=optimize,
                    verbose=False,
                )
            cache[config, optimize] = path
        return cache[config, optimize]

    return export


@pytest.mark.torch
@pytest.mark.parametrize("config", [PLAIN, BC], ids=["plain", "bc"])
def test_torch_export_round_trip(torch_export, config: DenseNetConfig) -> None:
    found, got, metadata = read_onnx(torch_export(config))
    assert found == config
    assert _equal(init_canonical(config, 0), got)
    assert metadata["source"].startswith("onnx (pytorch 2.") and metadata["running_var"] == "unbiased"


@pytest.mark.torch
def test_cli_convert_from_onnx(torch_export, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = torch_export(BC), tmp_path / "out.safetensors"
    code, stdout, err = run_cli(capsys, "convert", "--from", src, "--from-format", "onnx", "--to", out)
    assert code == 0, err
    assert "running variances: unbiased (PyTorch feeds the unbiased batch variance)" in stdout
    found = load_canonical(out)
    assert found.config == BC and _equal(init_canonical(BC, 0), found.weights)
    assert found.metadata["source"].startswith("onnx (pytorch ") and found.metadata["running_var"] == "unbiased"
    code, _, err = run_cli(capsys, "convert", "--from", src, "--from-format", "onnx", "--to", out, "--drop-rate", "0.2")
    assert code == 0, err
    assert load_canonical(out).config == BC.replace(drop_rate=0.2)
    wrong = tmp_path / "wrong.npz"
    code, _, err = run_cli(
        capsys, "convert", "--from", src, "--from-format", "onnx", "--to", wrong, "--num-classes", "3"
    )
    assert code == 2 and "num_classes: graph has 5, options state 3" in err and not wrong.exists()
    code, _, err = run_cli(capsys, "convert", "--from", src, "--to", wrong, "--to-format", "onnx")
    assert code == 2 and "unknown format 'onnx'" in err


@pytest.mark.torch
def test_missing_initializer(torch_export, tmp_path: Path) -> None:
    model = onnx.load(str(torch_export(PLAIN)))
    conv = [n for n in model.graph.node if n.op_type == "Conv"][2]
    (index,) = [i for i, t in enumerate(model.graph.initializer) if t.name == conv.input[1]]
    del model.graph.initializer[index]
    message = _read_error(_save(model, tmp_path / "m.onnx"))
    assert f"(Conv {conv.name!r}): input 1, the weight, ({conv.input[1]!r}) is not an initializer" in message


@pytest.mark.torch
def test_batchnorm_folded_into_convolutions(torch_export) -> None:
    """The exporter's default optimisation fuses a Conv + BatchNormalization pair (the stem's)."""
    message = _read_error(torch_export(BC, optimize=True))
    assert "layer 1 (Conv " in message and "feeds Relu" in message
    assert "folded the BatchNorm after it into the convolution" in message and "optimize=False" in message


@pytest.mark.torch
@pytest.mark.slow
def test_torchvision_densenet121(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """torchvision's own densenet121 (tests/helpers.py::torchvision_densenet), random weights and
    statistics: the graph's tensors are the state dict, as peers.from_torchvision reads it."""
    get_adapter("torch", request.config)
    densenet = torchvision_densenet(request.config)
    import torch

    torch.manual_seed(0)
    net = densenet.densenet121(weights=None, num_classes=10).eval()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                values = rng.standard_normal(tuple(t.shape)).astype(np.float32)
                t.copy_(torch.from_numpy(np.abs(values) + 0.5 if name.endswith("running_var") else values))
        path = tmp_path / "d121.onnx"
        example = (torch.zeros(1, 3, 64, 64),)
        torch.onnx.export(net, example, str(path), dynamo=True, opset_version=18, optimize=False, verbose=False)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    config, got, _ = read_onnx(path)
    expected_config = peers.infer_config(list(state), {k: v.shape for k, v in state.items()}, "torchvision")
    assert config == expected_config == named_config("densenet121", num_classes=10)
    assert _equal(peers.from_torchvision(state, config), got)
