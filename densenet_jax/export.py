"""Hand the Flax DenseNet to a serving runtime: JAX's own ``jax.export`` (serialized StableHLO)
and ONNX. Both trace the network with ``training=False``, so every BatchNorm normalises with its
running statistics, and keep the batch dimension symbolic.

ONNX goes through TensorFlow: jax2onnx, Flax's own ONNX exporter, cannot be installed beside the
pinned jax 0.7.1 and flax 0.12.0 (every release asks for a newer one of the two; docs/deploy.md
has pip's words), so ``jax2tf`` turns the function into TensorFlow operations and tf2onnx writes
those. ``enable_xla=False`` makes jax2tf emit plain TensorFlow convolutions and pools: with XLA
operations (``XlaReduceWindow``, ``XlaConv``) tf2onnx fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from common.adapter import Model

ONNX_FILE = "model.onnx"
NATIVE_FILE = "model.stablehlo"
NATIVE_FORMAT = "jax.export (serialized StableHLO)"


def _inference(model: Model) -> Callable[[jax.Array], jax.Array]:
    net, variables = model.net.clone(training=False), model.variables

    def logits(X: jax.Array) -> jax.Array:
        return net.apply(variables, X)

    return logits


def export_onnx(model: Model, directory: Path, shape: tuple[int, ...], opset: int) -> dict[str, object]:
    """Write ``directory/model.onnx`` for NHWC inputs of ``shape`` (any batch size)."""
    import tensorflow as tf
    import tf2onnx
    from jax.experimental import jax2tf

    signature = [tf.TensorSpec((None, *shape[1:]), tf.float32, name="X")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # enable_xla=False is deprecated, still the route
        converted = jax2tf.convert(
            _inference(model),
            polymorphic_shapes=["(b, " + ", ".join(map(str, shape[1:])) + ")"],
            native_serialization=False,
            enable_xla=False,
        )
        serve = tf.function(converted, autograph=False, input_signature=signature)
        tf2onnx.convert.from_function(
            serve, input_signature=signature, opset=opset, output_path=str(directory / ONNX_FILE)
        )
    exporter = f"jax2tf (jax {jax.__version__}, enable_xla=False) + tf2onnx {tf2onnx.__version__}"
    return {"exporter": exporter, "files": [ONNX_FILE]}


def export_native(model: Model, directory: Path, shape: tuple[int, ...]) -> dict[str, object]:
    """Write ``directory/model.stablehlo``: the jitted inference function with its weights as
    constants, for NHWC inputs of ``shape`` with a symbolic batch."""
    (batch,) = export.symbolic_shape("batch")
    exported = export.export(jax.jit(_inference(model)))(jax.ShapeDtypeStruct((batch, *shape[1:]), jnp.float32))
    (directory / NATIVE_FILE).write_bytes(exported.serialize())
    return {
        "exporter": f"jax.export {jax.__version__} (calling convention {exported.calling_convention_version})",
        "files": [NATIVE_FILE],
    }


def load_native(directory: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The deserialized function of an NHWC float32 batch, returning logits."""
    exported = export.deserialize(bytearray((directory / NATIVE_FILE).read_bytes()))

    def run(X: np.ndarray) -> np.ndarray:
        return np.asarray(exported.call(X))

    return run
