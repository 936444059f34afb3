"""Validation shared by the four backends and the core: image batches and weight dictionaries,
plain shape/dtype arithmetic, no framework."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import InputError, WeightFileError


def check_images(
    shape: tuple[int | None, ...],
    is_float: bool,
    dtype: str,
    *,
    layout: str,
    in_channels: int | None,
    min_size: int,
    what: str = "DenseNet",
) -> None:
    """Raise :class:`InputError` unless ``shape`` is a float image batch the network can take.

    ``layout`` is ``"NCHW"`` or ``"NHWC"``; ``in_channels`` is None while a lazy network has not
    yet seen its first batch (any channel count is then accepted).
    """
    # Unknown (None) sizes, as a traced graph may have, are not checked.
    shape = tuple(None if d is None else int(d) for d in shape)
    expected = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    if len(shape) != 4:
        raise InputError(
            f"{what} expects a rank-4 {layout} batch {expected}, got rank {len(shape)} shape "
            f"{shape}" + (" (add a batch axis)" if len(shape) == 3 else "")
        )
    if not is_float:
        raise InputError(f"{what} expects floating-point images (float32), got dtype {dtype}")
    if layout == "NCHW":
        n, c, h, w = shape
    else:
        n, h, w, c = shape
    if n is not None and n < 1:
        raise InputError(f"{what} got an empty batch: shape {shape}")
    if in_channels is not None and c is not None and c != in_channels:
        raise InputError(
            f"{what} was built for {in_channels}-channel images, got {c} channels ({layout} shape {shape})"
        )
    if (h is not None and h < min_size) or (w is not None and w < min_size):
        raise InputError(
            f"{what} needs images of at least {min_size}x{min_size}, got {h}x{w}; "
            "resize the input, e.g. Fashion-MNIST's 28x28 to 96x96"
        )


def weight_problems(spec: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray]) -> list[str]:
    """Every missing, unexpected, mis-shaped, non-float and non-finite tensor, one line each."""
    problems = []
    missing = [k for k in spec if k not in weights]
    unexpected = [k for k in weights if k not in spec]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected)}")
    for k, shape in spec.items():
        if k in weights:
            got = tuple(np.shape(weights[k]))
            if got != tuple(shape):
                problems.append(f"{k}: expected shape {tuple(shape)}, got {got}")
            elif not np.issubdtype(np.asarray(weights[k]).dtype, np.floating):
                problems.append(f"{k}: expected floating-point values, got {np.asarray(weights[k]).dtype}")
            elif not np.all(np.isfinite(weights[k])):
                problems.append(f"{k}: contains NaN or infinite values")
    return problems


def raise_problems(source: str, problems: list[str]) -> None:
    """One :class:`WeightFileError` listing every problem (nothing when there is none)."""
    if problems:
        raise WeightFileError(f"{source} do not fit the network:\n  " + "\n  ".join(problems))


def check_weights(
    spec: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray], source: str = "weights"
) -> None:
    """Raise one :class:`WeightFileError` listing every missing, unexpected and mis-shaped tensor."""
    raise_problems(source, weight_problems(spec, weights))
