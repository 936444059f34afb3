"""Starting weights for training (``densenet train --init FILE``): a canonical weight file, or a
peer's (torchvision, Keras Applications, Gluon model zoo) through the converters in
:mod:`common.weights.peers`, so that any backend starts from the very same tensors.

Fine-tuning: when the network to train predicts another number of classes than the file's, the
classifier (``head.fc.weight`` and ``head.fc.bias``) is replaced by the seeded canonical
initialisation (:func:`common.weights.canonical.init_canonical`); every other tensor comes from the file,
and any other difference (architecture, ``in_channels`` ...) is an error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.config import DenseNetConfig
from common.data.pipeline import sha256
from common.errors import WeightFileError
from common.weights import peers
from common.weights.canonical import CanonicalFile, config_differences, init_canonical, load_canonical

__all__ = ["FORMATS", "HEAD", "StartingWeights", "read_init", "starting_weights"]

FORMATS = ("canonical", *peers.FORMATS)
HEAD = ("head.fc.weight", "head.fc.bias")  # the tensors whose shape follows num_classes


class StartingWeights(NamedTuple):
    """Canonical tensors for the network to train, what ``run.json`` records about them, and a
    sentence for the console when the head was replaced (else None)."""

    weights: dict[str, np.ndarray]
    record: dict[str, Any]
    notice: str | None


def read_init(path: str | os.PathLike, fmt: str = "canonical") -> CanonicalFile:
    """The file ``--init`` names, as canonical tensors with its configuration and metadata."""
    if fmt not in FORMATS:
        raise WeightFileError(f"unknown --init-format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "canonical":
        return load_canonical(path)
    config, weights = peers.load_peer(path, fmt)
    # Keras and Gluon feed their running variances the biased batch variance (common.weights.canonical).
    running_var = "unbiased" if fmt == "torchvision" else "biased"
    return CanonicalFile(config, weights, {"source": fmt, "running_var": running_var})


def starting_weights(path: str | os.PathLike, fmt: str, config: DenseNetConfig, seed: int) -> StartingWeights:
    """The weights of ``path`` for a network of ``config``: the file's, with the head replaced by
    ``init_canonical(config, seed)``'s when only ``num_classes`` differs."""
    found = read_init(path, fmt)
    differences = [
        line
        for line in config_differences(found.config, config, ("file has", "network has"))
        if not line.startswith("num_classes:")
    ]
    if differences:
        raise WeightFileError(
            f"--init {path}: the file holds DenseNet {found.config.describe()}, the network to train is DenseNet "
            f"{config.describe()}; only num_classes may differ (the head is then replaced):\n  "
            + "\n  ".join(differences)
        )
    weights = dict(found.weights)
    record: dict[str, Any] = {
        "path": str(Path(path).resolve()),
        "format": fmt,
        "sha256": sha256(path),
        "source": found.metadata.get("source", "unknown"),
        "running_var": found.metadata["running_var"],
        "config": found.config.to_dict(),
        "head_replaced": None,
    }
    notice = None
    if found.config.num_classes != config.num_classes:
        fresh = init_canonical(config, seed)
        weights.update({k: fresh[k] for k in HEAD})
        record["head_replaced"] = {
            "tensors": list(HEAD),
            "file_classes": found.config.num_classes,
            "classes": config.num_classes,
            "init": f"common.weights.canonical.init_canonical(config, seed={seed})",
        }
        notice = (
            f"--init {path}: its head predicts {found.config.num_classes} classes, this run {config.num_classes}: "
            f"{' and '.join(HEAD)} are replaced by the seeded canonical initialisation (seed {seed}); "
            "every other tensor starts from the file"
        )
    return StartingWeights(weights, record, notice)
