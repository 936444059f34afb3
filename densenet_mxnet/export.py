"""Hand the Gluon DenseNet to a serving runtime: Gluon's own symbol + params pair
(``HybridBlock.export``) and ONNX through ``mx.onnx.export_model``. Both hold the hybridized
graph in inference mode, so every BatchNorm normalises with its running statistics; the batch
dimension stays free.

MXNet 1.9.1's ONNX exporter predates onnx 1.15 and asks it for two things it no longer has:
the module ``onnx.mapping`` (numpy dtype <-> ONNX type tables, removed in onnx 1.15; ``onnx.helper``
has the same tables as functions) and, through ``onnx.defs.onnx_opset_version()``, the newest
opset, which it then stamps on a graph translated with its opset 12/13 rules. An older onnx
cannot be installed beside the one PyTorch's exporter needs, so :func:`_mxnet_onnx` supplies the
tables and pins the opset to 13 while the exporter runs, and :func:`_weights_not_inputs` takes
the weights back out of the graph's inputs, where this exporter also lists them (ONNX Runtime
then cannot fold them as constants).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from common.adapter import Model
from densenet_mxnet._compat import mxnet as mx

ONNX_FILE = "model.onnx"
NATIVE_PREFIX = "model"
NATIVE_FILES = ("model-symbol.json", "model-0000.params")
NATIVE_FORMAT = "Gluon symbol + params"
MXNET_ONNX_OPSET = 13  # the newest opset MXNet 1.9.1 has translations for


def _graph(model: Model, shape: tuple[int, ...]) -> mx.gluon.HybridBlock:
    net = model.net
    net.hybridize(True)
    net(mx.nd.zeros(shape))  # records the symbol the export writes
    return net


def export_native(model: Model, directory: Path, shape: tuple[int, ...]) -> dict[str, object]:
    """Write ``directory/model-symbol.json`` and ``model-0000.params`` for NCHW inputs."""
    _graph(model, shape).export(str(directory / NATIVE_PREFIX), epoch=0)
    return {"exporter": f"HybridBlock.export (MXNet {mx.__version__})", "files": list(NATIVE_FILES)}


@contextlib.contextmanager
def _mxnet_onnx() -> Iterator[None]:
    import onnx
    import onnx.defs
    from onnx import TensorProto, helper

    tables = types.ModuleType("onnx.mapping")
    to_numpy = {}
    for code in TensorProto.DataType.values():
        with contextlib.suppress(Exception):  # types numpy has no dtype for (bfloat16, float8 ...)
            to_numpy[code] = helper.tensor_dtype_to_np_dtype(code)
    tables.TENSOR_TYPE_TO_NP_TYPE = to_numpy
    tables.NP_TYPE_TO_TENSOR_TYPE = {dtype: code for code, dtype in to_numpy.items()}
    newest, had_mapping = onnx.defs.onnx_opset_version, "onnx.mapping" in sys.modules
    sys.modules.setdefault("onnx.mapping", tables)
    onnx.mapping = sys.modules["onnx.mapping"]
    onnx.defs.onnx_opset_version = lambda: MXNET_ONNX_OPSET
    try:
        yield
    finally:
        onnx.defs.onnx_opset_version = newest
        if not had_mapping:
            del sys.modules["onnx.mapping"], onnx.mapping


def _weights_not_inputs(path: Path) -> None:
    import onnx

    graph = onnx.load(str(path))
    weights = {t.name for t in graph.graph.initializer}
    inputs = [i for i in graph.graph.input if i.name not in weights]
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)
    onnx.save(graph, str(path))


def export_onnx(model: Model, directory: Path, shape: tuple[int, ...], opset: int) -> dict[str, object]:
    """Write ``directory/model.onnx`` (opset 13 whatever ``opset`` asks: MXNet has no newer
    translations) for NCHW inputs of ``shape`` (any batch size)."""
    net = _graph(model, shape)
    net.export(str(directory / "graph"), epoch=0)
    symbol, params = str(directory / "graph-symbol.json"), str(directory / "graph-0000.params")
    try:
        with _mxnet_onnx():
            mx.onnx.export_model(
                symbol,
                params,
                [(1, *shape[1:])],
                [np.float32],
                str(directory / ONNX_FILE),
                dynamic=True,
                dynamic_input_shapes=[(None, *shape[1:])],
            )
    finally:
        Path(symbol).unlink(missing_ok=True)
        Path(params).unlink(missing_ok=True)
    _weights_not_inputs(directory / ONNX_FILE)
    exporter = f"mx.onnx.export_model (MXNet {mx.__version__}, opset {MXNET_ONNX_OPSET})"
    return {"exporter": exporter, "files": [ONNX_FILE], "opset": MXNET_ONNX_OPSET}


def load_native(directory: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The imported ``SymbolBlock`` as a function of an NCHW float32 batch, returning logits."""
    symbol, params = (str(directory / f) for f in NATIVE_FILES)
    block = mx.gluon.SymbolBlock.imports(symbol, ["data"], params)

    def run(X: np.ndarray) -> np.ndarray:
        return block(mx.nd.array(X)).asnumpy()

    return run
