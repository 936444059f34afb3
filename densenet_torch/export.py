"""Hand the PyTorch DenseNet to a serving runtime: ONNX through ``torch.onnx.export`` and PyTorch's
own ``torch.export`` program (``.pt2``). Both trace the network in inference mode, so every
BatchNorm normalises with its running statistics, and keep the batch dimension symbolic."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.adapter import Model

ONNX_FILE = "model.onnx"
NATIVE_FILE = "model.pt2"
NATIVE_FORMAT = "torch.export (.pt2)"


def _traced(model: Model, shape: tuple[int, ...]) -> tuple[torch.nn.Module, tuple[torch.Tensor], tuple[dict]]:
    net = model.net.eval()
    # The book's NCHW strides: a channels-last example would be recorded in the program.
    net.to(memory_format=torch.contiguous_format)
    batch = torch.export.Dim("batch", min=1, max=65536)
    return net, (torch.zeros(shape),), ({0: batch},)


def export_onnx(model: Model, directory: Path, shape: tuple[int, ...], opset: int) -> dict[str, object]:
    """Write ``directory/model.onnx`` for NCHW inputs of ``shape`` (any batch size)."""
    net, example, dynamic = _traced(model, shape)
    with torch.no_grad():
        torch.onnx.export(
            net,
            example,
            str(directory / ONNX_FILE),
            dynamo=True,
            opset_version=opset,
            input_names=["X"],
            output_names=["Y"],
            dynamic_shapes=dynamic,
            external_data=False,  # one file: the weights inside the graph, as the other exporters write
            # Unoptimised: the optimiser folds a BatchNorm that follows a convolution (the stem, a
            # DenseNet-BC bottleneck) into it, and its running statistics could not be read back
            # (`densenet convert --from-format onnx`). ONNX Runtime fuses them itself when it loads.
            optimize=False,
            verbose=False,
        )
    return {"exporter": f"torch.onnx.export (dynamo) {torch.__version__}", "files": [ONNX_FILE]}


def export_native(model: Model, directory: Path, shape: tuple[int, ...]) -> dict[str, object]:
    """Write ``directory/model.pt2``: the ``torch.export`` program and its weights."""
    net, example, dynamic = _traced(model, shape)
    with torch.no_grad():
        program = torch.export.export(net, example, dynamic_shapes=dynamic)
    torch.export.save(program, str(directory / NATIVE_FILE))
    return {"exporter": f"torch.export {torch.__version__}", "files": [NATIVE_FILE]}


def load_native(directory: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The saved program as a function of an NCHW float32 batch, returning logits."""
    module = torch.export.load(str(directory / NATIVE_FILE)).module()

    def run(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(X))).numpy()

    return run
