"""Running an export: ONNX Runtime for ONNX files (no framework needed), the backend's own loader
for a native format. Either way the result is a function of an NCHW float32 batch that returns
logits, the input transposed to the artefact's layout on the way in."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import BackendUnavailable
from common.layout import to_layout

__all__ = ["onnx_session", "onnxruntime_version", "runner"]


def onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable(f"ONNX Runtime is not installed ({e}); pip install onnxruntime") from None
    return onnxruntime.__version__


def onnx_session(path: str | os.PathLike, threads: int) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU computing with ``threads`` threads, as the
    frameworks do under ``--threads`` (its inter-op pool unused: the graph runs sequentially)."""
    onnxruntime_version()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings name graph internals, not problems
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(directory: str | os.PathLike, manifest: dict[str, Any], threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The export in ``directory`` as ``f(X NCHW float32) -> logits``, loaded by its own runtime."""
    directory = Path(directory)
    layout = manifest["layout"]
    if manifest["format"] in ("onnx", "onnx-int8"):
        session = onnx_session(directory / manifest["artefact"], threads)
        name = session.get_inputs()[0].name

        def run(X: np.ndarray) -> np.ndarray:
            return session.run(None, {name: np.ascontiguousarray(to_layout(X, layout), np.float32)})[0]

        return run
    from common.registry import load_backend

    native = load_backend(manifest["backend"]).exporter().load_native(directory)

    def run_native(X: np.ndarray) -> np.ndarray:
        return np.asarray(native(np.ascontiguousarray(to_layout(X, layout), np.float32)))

    return run_native
