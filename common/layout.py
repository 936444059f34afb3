"""Layout conversion between the canonical (PyTorch/MXNet) layout and the NHWC frameworks'.

The one place that knows NCHW/NHWC, OIHW/HWIO and (out, in)/(in, out). Works on numpy arrays.
"""

from __future__ import annotations

import numpy as np


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))


def dense_to_in_out(w: np.ndarray) -> np.ndarray:
    """(out, in) -> (in, out), as Keras and Flax store a dense kernel."""
    return np.ascontiguousarray(w.T)


def dense_to_out_in(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """A canonical NCHW activation (or a 2-D logits array) in ``layout``."""
    if layout == "NHWC" and x.ndim == 4:
        return nchw_to_nhwc(x)
    return x


def from_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """An activation in ``layout`` back to canonical NCHW (2-D arrays pass through)."""
    if layout == "NHWC" and x.ndim == 4:
        return nhwc_to_nchw(x)
    return x


def param_to_native(value: np.ndarray, layout: str) -> np.ndarray:
    """A canonical tensor converted for a framework whose activations use ``layout``: in NHWC
    frameworks conv kernels OIHW -> HWIO and dense weights (out, in) -> (in, out); the rank tells
    which, vectors pass through."""
    if layout == "NHWC":
        if value.ndim == 4:
            return oihw_to_hwio(value)
        if value.ndim == 2:
            return dense_to_in_out(value)
    return value


def param_from_native(value: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of :func:`param_to_native`: a framework's tensor in the canonical layout."""
    if layout == "NHWC":
        if value.ndim == 4:
            return hwio_to_oihw(value)
        if value.ndim == 2:
            return dense_to_out_in(value)
    return value
