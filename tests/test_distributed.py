"""Data-parallel training on each framework's own engine (docs/distributed.md).

One launch per backend runs 2 workers of ``tests/distributed_worker.py`` (one step per dtype,
with and without --sync-bn) and a 2-worker ``densenet train``; the assertions share it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import reference_grad
from common.distributed import launch, shard_batches, shard_range
from common.distributed.sharding import ShardingError
from common.harness import seeded_batches
from common.parity import PARITY_CASE, bound
from common.weights import init_canonical
from tests.distributed_worker import BATCH, CONFIG, LR, SEED, SIZE

pytestmark = pytest.mark.distributed

DTYPES = {"torch": "float32,float64", "jax": "float32,float64", "tf": "float32,float64", "mxnet": "float32"}


def _max_abs(w: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.max(np.abs(v))) if np.size(v) else 0.0 for k, v in w.items()}


def oracle_step(shards: int) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
    """The float64 numpy step on the seeded global batch, BatchNorm statistics taken per shard
    (``shards`` equal shards; 1: the single-process step): the weights after it, the scale of each
    tensor (as common.parity's sgd-step check) and the global mean loss."""
    X, y = seeded_batches(CONFIG, SIZE, BATCH, 1, SEED)[0]
    w0 = init_canonical(CONFIG, SEED)
    parts = [reference_grad.loss_and_grads(CONFIG, w0, X[a:b], y[a:b]) for a, b in
             (shard_range(BATCH, r, shards) for r in range(shards))]
    after = {
        k: np.asarray(v, np.float64) - LR * np.mean([g.params[k] for g in parts], axis=0) if k in parts[0].params else v
        for k, v in w0.items()
    }
    stats = {k: np.mean([g.stats[k] for g in parts], axis=0) for k in parts[0].stats}
    after.update(stats)
    scales = {**_max_abs({k: v for k, v in after.items() if k not in stats})}
    scales.update({k: max(g.stat_scales[k] for g in parts) for k in stats})
    return after, scales, float(np.mean([g.loss for g in parts]))


def relative_error(a, b, scales) -> tuple[float, str]:
    worst = (0.0, "")
    for k, s in scales.items():
        e = float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) / s if s else 0.0
        worst = max(worst, (e, k))
    return worst
