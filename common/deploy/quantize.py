"""int8 for serving: post-training static quantisation of an ONNX export by ONNX Runtime's
quantiser, calibrated on training images.

The float32 graph is first pre-processed (``quant_pre_process``: shapes inferred, each BatchNorm
folded into the convolution before it where one is, constants folded), then quantised in QDQ
form: weights int8 per output channel, activations uint8 per tensor with MinMax ranges taken
over the calibration images. U8S8 is the pairing ONNX Runtime's x86 kernels (AVX512-VNNI,
AMX-INT8) are written for. The first and last layers are quantised too; docs/deploy.md has the
accuracy it costs and the speed it buys.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common.layout import to_layout

__all__ = ["OPS", "quantize"]

# What is quantised: the convolutions and the classifier, where the arithmetic is. A DenseNet's
# BatchNorms come after a concatenation, not a convolution, so none folds away; quantising them
# too only wraps each in a quantise/dequantise pair (measured slower, docs/deploy.md).
OPS = ["Conv", "Gemm", "MatMul"]


def quantize(float_model: Path, out: Path, images: np.ndarray, layout: str, batch_size: int = 32) -> dict[str, Any]:
    """Write the int8 model of ``float_model`` to ``out``, calibrated on ``images`` (NCHW float32,
    fed in ``layout``); returns what the manifest records about it."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(float_model), load_external_data=False).graph.input[0].name

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(images), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            if start is None:
                return None
            X = images[start : start + batch_size]
            return {name: np.ascontiguousarray(to_layout(X, layout), np.float32)}

    with tempfile.TemporaryDirectory(prefix="densenet-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX's own shape inference: the symbolic one fails on the Constant nodes an unoptimised
        # PyTorch export holds (a scalar attribute where it expects a tensor).
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            Images(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=OPS,
        )
    return {
        "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}: static, QDQ, U8S8, per-channel weights, "
        "MinMax calibration",
        "calibration_images": len(images),
    }
