"""The canonical weight format: names and shapes from ``common.config.canonical_spec``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import WeightFileError


def check_weights(
    spec: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray], source: str = "weights"
) -> None:
    """Raise one :class:`WeightFileError` listing every missing, unexpected and mis-shaped tensor."""
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
    if problems:
        raise WeightFileError(f"{source} do not fit the network:\n  " + "\n  ".join(problems))
