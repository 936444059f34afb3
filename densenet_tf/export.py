"""Hand the Keras DenseNet to a serving runtime: ONNX through tf2onnx and a TensorFlow SavedModel
(Keras's own ``Model.export``). Both trace the network with ``training=False``, so every BatchNorm
normalises with its running statistics, and keep the batch dimension unknown (``None``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from common.adapter import Model

ONNX_FILE = "model.onnx"
NATIVE_FILE = "saved_model"
NATIVE_FORMAT = "TensorFlow SavedModel"


def _signature(shape: tuple[int, ...]) -> list[tf.TensorSpec]:
    return [tf.TensorSpec((None, *shape[1:]), tf.float32, name="X")]


def export_onnx(model: Model, directory: Path, shape: tuple[int, ...], opset: int) -> dict[str, object]:
    """Write ``directory/model.onnx`` for NHWC inputs of ``shape`` (any batch size)."""
    import tf2onnx  # only exporting needs it

    net = model.net
    signature = _signature(shape)

    @tf.function(input_signature=signature)
    def serve(X: tf.Tensor) -> tf.Tensor:
        return net(X, training=False)

    tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset, output_path=str(directory / ONNX_FILE))
    return {"exporter": f"tf2onnx {tf2onnx.__version__} (TensorFlow {tf.__version__})", "files": [ONNX_FILE]}


def export_native(model: Model, directory: Path, shape: tuple[int, ...]) -> dict[str, object]:
    """Write ``directory/saved_model``, whose ``serve`` endpoint maps NHWC images to logits."""
    import keras

    model.net.export(
        str(directory / NATIVE_FILE), format="tf_saved_model", input_signature=_signature(shape), verbose=False
    )
    return {"exporter": f"keras.Model.export {keras.__version__} (TensorFlow {tf.__version__})", "files": [NATIVE_FILE]}


def load_native(directory: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The SavedModel's ``serve`` endpoint as a function of an NHWC float32 batch, returning logits."""
    loaded = tf.saved_model.load(str(directory / NATIVE_FILE))

    def run(X: np.ndarray) -> np.ndarray:
        return loaded.serve(tf.constant(X)).numpy()

    return run
