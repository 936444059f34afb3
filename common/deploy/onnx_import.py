"""Read an ONNX DenseNet's weights into the canonical format, whichever exporter wrote it.

Tensor names differ from one exporter to the next, so nothing here reads them: the graph's
``Conv``, ``BatchNormalization`` and classifier (``Gemm``, or ``MatMul`` + ``Add``) nodes are
taken in the order the exporter wrote them (topological), the configuration is inferred from
their shapes, and the tensors are paired with :func:`common.arch.canonical_layers` by position.
Values are copied exactly. Convolution biases count as absent when every one is zero: exporters
write a bias-free conv with a zero bias or none, and zeros compute the same function. Only the
``onnx`` package is needed, imported when a file is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.arch import canonical_layers, canonical_spec
from common.config import BN_EPS, DenseNetConfig
from common.errors import ConfigError, Failed, WeightFileError
from common.weights.canonical import RUNNING_VAR_CONVENTIONS, check_weights, config_differences

__all__ = ["MIN_OPSET", "RUNNING_VAR_KEY", "confirm_config", "read_onnx"]

MIN_OPSET = 9  # BatchNormalization lost its spatial/consumed_inputs forms in opset 9
RUNNING_VAR_KEY = "densenet.running_var"  # metadata_props entry stating the running-variance convention
_EXACT = (np.dtype(np.float32), np.dtype(np.float16))  # both widen to float32 without rounding
_FOLDED_BY = ("Relu", "Clip", "Mul")  # in a DenseNet a conv feeds a BatchNorm, a Concat or a pool
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")  # BatchNormalization inputs 1-4
_FLOAT32_LIKE = "densenet.float32_like"  # stands in for CastLike's type-only input when folding
_MAX_FOLD = 64  # nodes computing one weight from constants; more is not a weight
# What an ONNX producer name tells of the running variances it wrote (the file's metadata wins).
_PRODUCERS = {
    "pytorch": ("unbiased", "PyTorch feeds the unbiased batch variance"),
    "mxnet": ("biased", "MXNet Gluon feeds the biased batch variance"),
}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise Failed("reading ONNX files needs the onnx package, which is not installed: pip install onnx") from None
    return onnx


@dataclass
class _Layer:
    """A Conv, BatchNormalization or classifier node with its tensors under canonical leaf names."""

    kind: str  # conv, bn, fc
    index: int  # 1-based, in graph order
    node: str  # "Conv 'name'"
    tensors: dict[str, np.ndarray]
    source: str  # the data input, through Identity nodes
    output: str

    @property
    def out_channels(self) -> int:
        return int(self.tensors["weight"].shape[0])

    @property
    def in_channels(self) -> int:
        return self.out_channels if self.kind == "bn" else int(self.tensors["weight"].shape[1])

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.tensors["weight"].shape[2:]) if self.kind == "conv" else ()

    def describe(self) -> str:
        if self.kind == "bn":
            what = f"a BatchNorm over {self.out_channels} channels"
        elif self.kind == "fc":
            what = f"a dense layer with {self.in_channels} inputs and {self.out_channels} outputs"
        else:
            size = "x".join(map(str, self.kernel))
            what = f"a {size} conv with {self.in_channels} inputs and {self.out_channels} outputs"
        return f"layer {self.index} ({self.node}) is {what}"


class _Graph:
    """The graph's constants (initializers, ``Constant`` nodes, ``Identity`` of either) and data flow."""

    def __init__(self, model: Any, where: str) -> None:
        onnx, graph = _onnx(), model.graph
        self.where, self.nodes, self.opsets = where, list(graph.node), list(model.opset_import)
        self.functions = list(model.functions)
        self.consts: dict[str, np.ndarray] = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        self.alias: dict[str, str] = {}
        self.producer: dict[str, Any] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant":
                value = _constant_value(onnx, node)
                if value is not None:
                    self.consts[node.output[0]] = value
            elif node.op_type == "Identity":
                if node.input[0] in self.consts:
                    self.consts[node.output[0]] = self.consts[node.input[0]]
                else:
                    self.alias[node.output[0]] = self.resolve(node.input[0])
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            if node.op_type != "Identity":
                for name in node.input:
                    self.consumers.setdefault(self.resolve(name), []).append(node)

    def resolve(self, name: str) -> str:
        return self.alias.get(name, name)

    def value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant or computed from constants only."""
        if name not in self.consts and name in self.producer:
            folded = self.fold(name)
            if folded is not None:
                self.consts[name] = folded
        return self.consts.get(name)

    def fold(self, name: str) -> np.ndarray | None:
        # Exporters that skip constant folding compute some tensors from constants (PyTorch's zero
        # bias of a bias-free conv: an Expand of 0, CastLike the input); onnx's reference runtime
        # evaluates them. CastLike reads only the type of its second input, float32 for a weight.
        onnx = _onnx()
        nodes: dict[int, Any] = {}
        stack, consts = [name], {_FLOAT32_LIKE}
        while stack:
            item = stack.pop()
            if not item or item in consts or id(self.producer.get(item)) in nodes:
                continue
            if item in self.consts:
                consts.add(item)
                continue
            node = self.producer.get(item)
            if node is None or node.op_type.startswith("Random") or len(nodes) >= _MAX_FOLD:
                return None
            if node.op_type == "CastLike" and node.input[1] not in self.consts:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.input[1] = _FLOAT32_LIKE
                nodes[id(node)] = copy
                stack.append(node.input[0])
            else:
                nodes[id(node)] = node
                stack.extend(node.input)
        return self._evaluate([nodes[id(n)] for n in self.nodes if id(n) in nodes], consts, name)

    def _evaluate(self, nodes: list[Any], consts: set[str], name: str) -> np.ndarray | None:
        onnx = _onnx()
        from onnx.reference import ReferenceEvaluator

        values = {**self.consts, _FLOAT32_LIKE: np.zeros(0, np.float32)}
        inits = [onnx.numpy_helper.from_array(np.asarray(values[c]), c) for c in sorted(consts)]
        graph = onnx.helper.make_graph(nodes, "fold", [], [onnx.helper.make_empty_tensor_value_info(name)], inits)
        model = onnx.helper.make_model(graph, opset_imports=self.opsets, functions=self.functions)
        try:
            (value,) = ReferenceEvaluator(model).run(None, {})
        except Exception:  # an op the reference runtime lacks: the caller reports the input as computed
            return None
        return np.asarray(value)

    def tensor(self, node: Any, i: int, what: str, index: int) -> np.ndarray:
        """Input ``i`` of ``node``, which must be a constant or computed from constants, as an array."""
        name = node.input[i] if i < len(node.input) else ""
        value = self.value(name) if name else None
        if value is not None:
            return value
        if not name:
            problem = "is missing"
        elif name in self.producer:
            maker = self.producer[name]
            problem = f"({name!r}) is computed by {maker.op_type} {maker.name!r}, not stored in the graph"
        else:
            problem = f"({name!r}) is not an initializer of the graph"
        raise WeightFileError(f"{self.where}: layer {index} ({_label(node)}): input {i}, the {what}, {problem}")

    def optional(self, node: Any, i: int, what: str, index: int) -> np.ndarray | None:
        has = i < len(node.input) and node.input[i]
        return self.tensor(node, i, what, index) if has else None


def _constant_value(onnx: Any, node: Any) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return onnx.numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(attr), np.float32)
    return None


def _label(node: Any) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _attrs(node: Any) -> dict[str, Any]:
    helper = _onnx().helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------------
# Loading


def _load(path: Path) -> Any:
    onnx = _onnx()
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and onnx's own errors have no common base
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightFileError(f"{path}: not an ONNX model ({first})") from None
    if not model.graph.node or not model.opset_import:
        raise WeightFileError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    return model


def _check_opset(model: Any, where: str) -> None:
    newest = _onnx().defs.onnx_opset_version()
    found = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not found:
        raise WeightFileError(f"{where}: the graph imports no opset of the default ONNX domain")
    if not MIN_OPSET <= found[0] <= newest:
        raise WeightFileError(
            f"{where}: opset {found[0]} is not supported; this reader takes opsets {MIN_OPSET} to {newest} "
            f"(the newest the installed onnx {_onnx().__version__} knows)"
        )


# ---------------------------------------------------------------------------------------------
# Layers


def _float32(layer: _Layer, where: str) -> _Layer:
    for leaf, value in layer.tensors.items():
        if value.dtype not in _EXACT:
            raise WeightFileError(
                f"{where}: layer {layer.index} ({layer.node}): its {leaf} is {value.dtype}; this reader copies "
                "values exactly and takes float32 or float16 only"
            )
        layer.tensors[leaf] = np.ascontiguousarray(value, dtype=np.float32)
    return layer


def _conv(g: _Graph, node: Any, index: int) -> _Layer:
    weight = g.tensor(node, 1, "weight", index)
    group = _attrs(node).get("group", 1)
    if weight.ndim != 4 or group != 1:
        what = f"a grouped convolution (group={group})" if group != 1 else f"a {weight.ndim - 2}-D convolution"
        raise WeightFileError(f"{g.where}: layer {index} ({_label(node)}) is {what}; a DenseNet has 2-D ones only")
    tensors = {"weight": weight}
    bias = g.optional(node, 2, "bias", index)
    if bias is not None:
        tensors["bias"] = bias
    return _Layer("conv", index, _label(node), tensors, g.resolve(node.input[0]), node.output[0])


def _bn(g: _Graph, node: Any, index: int) -> _Layer:
    eps = _attrs(node).get("epsilon", 1e-5)
    if np.float32(eps) != np.float32(BN_EPS):
        raise WeightFileError(
            f"{g.where}: layer {index} ({_label(node)}) has BatchNorm epsilon {eps:.6g}; the canonical networks "
            f"use {BN_EPS:g} (common.config.BN_EPS), so its outputs would differ"
        )
    names = ("scale", "bias (B)", "running mean", "running variance")
    tensors = {
        leaf: g.tensor(node, i + 1, what, index).reshape(-1) for i, (leaf, what) in enumerate(zip(_BN_LEAVES, names))
    }
    return _Layer("bn", index, _label(node), tensors, g.resolve(node.input[0]), node.output[0])


def _gemm(g: _Graph, node: Any, index: int) -> _Layer:
    attrs = _attrs(node)
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise WeightFileError(
            f"{g.where}: layer {index} ({_label(node)}) is a Gemm with transA={attrs.get('transA', 0)}, "
            f"alpha={attrs.get('alpha', 1.0)}, beta={attrs.get('beta', 1.0)}; a classifier has 0, 1, 1"
        )
    weight = g.tensor(node, 1, "weight", index)
    weight = weight if attrs.get("transB", 0) else weight.T  # canonical: (out, in)
    return _fc(g, node, index, weight, g.optional(node, 2, "bias", index), node.output[0])


def _matmul(g: _Graph, node: Any, index: int) -> _Layer | None:
    """``MatMul(X, W)`` with a constant ``W`` and the ``Add`` of a constant bias after it."""
    weight = g.value(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return None
    add = next((n for n in g.consumers.get(node.output[0], []) if n.op_type == "Add"), None)
    bias = None
    if add is not None:
        other = [name for name in add.input if g.resolve(name) != node.output[0]]
        bias = g.value(other[0]) if len(other) == 1 else None
    output = add.output[0] if bias is not None else node.output[0]
    return _fc(g, node, index, weight.T, bias, output)


def _fc(g: _Graph, node: Any, index: int, weight: np.ndarray, bias: np.ndarray | None, output: str) -> _Layer:
    if weight.ndim != 2:
        raise WeightFileError(f"{g.where}: layer {index} ({_label(node)}) has a {weight.ndim}-D weight; expected 2-D")
    # An exporter may drop an all-zero bias; zeros compute the same function.
    bias = np.zeros(weight.shape[0], weight.dtype) if bias is None else bias.reshape(-1)
    if bias.shape != (weight.shape[0],):
        raise WeightFileError(
            f"{g.where}: layer {index} ({_label(node)}) has {bias.size} biases for {weight.shape[0]} outputs"
        )
    return _Layer("fc", index, _label(node), {"weight": weight, "bias": bias}, g.resolve(node.input[0]), output)


def _layers(g: _Graph) -> list[_Layer]:
    """Every Conv, BatchNormalization and classifier, in graph order."""
    layers: list[_Layer] = []
    readers = {"Conv": _conv, "BatchNormalization": _bn, "Gemm": _gemm}
    for node in g.nodes:
        index = len(layers) + 1
        if node.op_type in readers:
            layers.append(readers[node.op_type](g, node, index))
        elif node.op_type == "MatMul" and (found := _matmul(g, node, index)) is not None:
            layers.append(found)
    return [_float32(layer, g.where) for layer in layers]


def _check_not_folded(g: _Graph, layers: list[_Layer]) -> None:
    convs = [layer for layer in layers if layer.kind == "conv"]
    if not convs:
        ops = sorted({n.op_type for n in g.nodes})
        raise WeightFileError(
            f"{g.where}: not a DenseNet: the graph has no Conv nodes (it has {', '.join(ops[:12])}"
            f"{', ...' if len(ops) > 12 else ''})"
        )
    if not any(layer.kind == "bn" for layer in layers):
        raise WeightFileError(
            f"{g.where}: the graph has {len(convs)} Conv nodes and no BatchNormalization: its exporter folded "
            "the BatchNorms into Mul/Add or into the convolutions (tf2onnx does, for Keras and jax2tf graphs), so "
            "their running statistics cannot be recovered from it; export from PyTorch or MXNet, or convert the "
            "framework's own weight file instead"
        )
    for conv in convs:
        folded = next((n for n in g.consumers.get(conv.output, []) if n.op_type in _FOLDED_BY), None)
        if folded is not None:
            raise WeightFileError(
                f"{g.where}: layer {conv.index} ({conv.node}) feeds {_label(folded)} directly: the exporter folded "
                "the BatchNorm after it into the convolution, so its running statistics cannot be recovered; "
                "export without graph optimisation (torch.onnx.export(..., optimize=False)) or convert the "
                "framework's own weight file instead"
            )


# ---------------------------------------------------------------------------------------------
# The configuration the layers show


class _Parser:
    """Walks the layers the way :func:`common.arch.walk` builds them, inferring the configuration."""

    def __init__(self, layers: list[_Layer], where: str) -> None:
        self.layers, self.where, self.pos = layers, where, 0
        self.growth: int | None = None
        self.width: int | None = None  # bottleneck output channels; 0 for the book's plain layer

    def peek(self) -> _Layer | None:
        return self.layers[self.pos] if self.pos < len(self.layers) else None

    def fail(self, text: str) -> WeightFileError:
        return WeightFileError(f"{self.where}: not a DenseNet this reader knows: {text}")

    def take(self, kind: str, what: str, channels: int | None = None, kernel: int | None = None) -> _Layer:
        layer = self.peek()
        if layer is None:
            raise self.fail(f"the graph ends where {what} was expected")
        if layer.kind != kind or (kernel is not None and layer.kernel != (kernel, kernel)):
            raise self.fail(f"{layer.describe()}; expected {what}")
        if channels is not None and layer.in_channels != channels:
            raise self.fail(f"{layer.describe()}; {what} here takes {channels}")
        self.pos += 1
        return layer

    def growth_rate(self, conv: _Layer) -> int:
        if self.growth is None:
            self.growth = conv.out_channels
        elif conv.out_channels != self.growth:
            raise self.fail(f"{conv.describe()}; the dense layers before it add {self.growth} (the growth rate)")
        return self.growth

    def bottleneck(self, width: int, conv: _Layer) -> None:
        if self.width is None:
            self.width = width
        elif width != self.width:
            plain = "no bottleneck" if not self.width else f"a bottleneck to {self.width} channels"
            raise self.fail(f"{conv.describe()}; the dense layers before it have {plain}")

    def dense_or_transition(self, channels: int) -> tuple[str, int]:
        """After a BatchNorm over ``channels``: a dense layer (``dense``, its new features) or a
        transition (``transition``, the channels it keeps)."""
        conv = self.take("conv", "a convolution after the BatchNorm", channels)
        if conv.kernel == (3, 3):
            self.bottleneck(0, conv)
            return "dense", self.growth_rate(conv)
        if conv.kernel != (1, 1):
            raise self.fail(f"{conv.describe()}; a dense layer or transition has a 3x3 or 1x1 conv here")
        after = self.peek()
        if after is None or after.kind != "bn" or after.source != conv.output:
            return "transition", conv.out_channels
        self.bottleneck(conv.out_channels, conv)
        self.take("bn", "the bottleneck's BatchNorm", conv.out_channels)
        return "dense", self.growth_rate(self.take("conv", "the bottleneck's 3x3 conv", conv.out_channels, 3))

    def parse(self) -> DenseNetConfig:
        stem = self.take("conv", "the 7x7 stem convolution first", kernel=7)
        channels = stem.out_channels
        self.take("bn", "the stem's BatchNorm", channels)
        arch, transitions, count = [], [], 0
        while True:
            self.take("bn", "a BatchNorm (of a dense layer, a transition or the head)", channels)
            nxt = self.peek()
            if nxt is not None and nxt.kind == "fc":
                self.take("fc", "the classifier", channels)
                break
            kind, out = self.dense_or_transition(channels)
            if kind == "dense":
                channels, count = channels + out, count + 1
                continue
            if not count:
                raise self.fail(f"dense block {len(arch) + 1} has no dense layers (layer {self.pos} is a transition)")
            arch.append(count)
            transitions.append((channels, out))
            channels, count = out, 0
        if not count:
            raise self.fail(f"dense block {len(arch) + 1} has no dense layers before the head")
        if self.peek() is not None:
            raise self.fail(f"{self.peek().describe()}; expected the end of the network after the classifier")
        return self.config(stem, tuple([*arch, count]), transitions)

    def config(self, stem: _Layer, arch: tuple[int, ...], transitions: list[tuple[int, int]]) -> DenseNetConfig:
        width = self.width or 0
        if width % self.growth:
            raise self.fail(f"the bottleneck width {width} is not a multiple of the growth rate {self.growth}")
        try:
            return DenseNetConfig(
                num_channels=stem.out_channels,
                growth_rate=self.growth,
                arch=arch,
                num_classes=self.layers[-1].out_channels,
                in_channels=stem.in_channels,
                bn_size=width // self.growth or None,
                compression=_compression(transitions, self.where),
                conv_bias=any(np.any(layer.tensors.get("bias", 0)) for layer in self.layers if layer.kind == "conv"),
            )
        except ConfigError as e:
            raise self.fail(str(e)) from None


def _compression(transitions: list[tuple[int, int]], where: str) -> float:
    """A compression for which ``int(channels * compression)`` gives every transition's output, the
    roundest one first (0.5, not 0.5000001)."""
    if not transitions:
        return 0.5
    ratios = [out / channels for channels, out in transitions]
    candidates = [round(ratios[0], digits) for digits in range(1, 7)] + ratios
    candidates += [float(np.nextafter(r, 2.0)) for r in ratios]  # where out/in rounds down
    for c in candidates:
        if 0 < c <= 1 and all(int(channels * c) == out for channels, out in transitions):
            return c
    shown = ", ".join(f"{out} of {channels}" for channels, out in transitions)
    raise WeightFileError(f"{where}: the transitions keep {shown} channels; no single compression gives them all")


# ---------------------------------------------------------------------------------------------
# Canonical weights and metadata


def _canonical(layers: list[_Layer], config: DenseNetConfig, where: str) -> dict[str, np.ndarray]:
    expected = canonical_layers(config)
    kinds = [kind for _, kind in expected]
    if kinds != [layer.kind for layer in layers]:
        raise WeightFileError(
            f"{where}: the graph's {len(layers)} layers do not follow DenseNet {config.describe()} "
            f"({len(expected)} layers)"
        )
    weights: dict[str, np.ndarray] = {}
    for (prefix, kind), layer in zip(expected, layers):
        for leaf, value in layer.tensors.items():
            weights[f"{prefix}.{leaf}"] = value
        if kind == "conv" and not config.conv_bias:
            weights.pop(f"{prefix}.bias", None)  # all zeros (config): what exporters write for no bias
        elif kind == "conv" and f"{prefix}.bias" not in weights:
            weights[f"{prefix}.bias"] = np.zeros(layer.out_channels, np.float32)  # dropped as all zeros
    spec = canonical_spec(config)
    check_weights(spec, weights, source=f"{where}: tensors")
    return {k: weights[k] for k in spec}


def _metadata(model: Any, where: str) -> dict[str, str]:
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p) or "producer unknown"
    props = {p.key: p.value for p in model.metadata_props}
    if RUNNING_VAR_KEY in props:
        running_var, basis = props[RUNNING_VAR_KEY], f"the file's {RUNNING_VAR_KEY} metadata"
        if running_var not in RUNNING_VAR_CONVENTIONS:
            raise WeightFileError(
                f"{where}: metadata {RUNNING_VAR_KEY} is {running_var!r}; expected one of "
                f"{', '.join(RUNNING_VAR_CONVENTIONS)}"
            )
    else:
        # MXNet's own exporter writes no producer name: such a file gets the canonical convention.
        default = ("unbiased", f"assumed: the file does not say (its {RUNNING_VAR_KEY} metadata would)")
        running_var, basis = _PRODUCERS.get(model.producer_name.lower(), default)
    return {"source": f"onnx ({producer})", "running_var": running_var, "running_var_basis": basis}


def read_onnx(path: str | os.PathLike) -> tuple[DenseNetConfig, dict[str, np.ndarray], dict[str, str]]:
    """An ONNX DenseNet's configuration, canonical float32 weights and metadata (``source``,
    ``running_var`` and ``running_var_basis``, why that convention). Raises
    :class:`WeightFileError` with one line on anything else."""
    path = Path(path)
    model = _load(path)
    where = str(path)
    _check_opset(model, where)
    graph = _Graph(model, where)
    layers = _layers(graph)
    _check_not_folded(graph, layers)
    config = _Parser(layers, where).parse()
    return config, _canonical(layers, config, where), _metadata(model, where)


def confirm_config(path: str | os.PathLike, found: DenseNetConfig, stated: DenseNetConfig) -> DenseNetConfig:
    """``stated`` (``--config`` and the network options) if it has the tensors ``found`` has, e.g. with a
    ``drop_rate`` the graph cannot show; else a :class:`WeightFileError` listing the differences."""
    if canonical_spec(stated) == canonical_spec(found):
        return stated
    differences = config_differences(found, stated, ("graph has", "options state"))
    raise WeightFileError(
        f"{path}: the graph holds DenseNet {found.describe()}, not the network the options state:\n  "
        + "\n  ".join(differences)
    )
