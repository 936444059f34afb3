"""A worker of the distributed step tests (``tests/test_distributed.py``), started by
``common.distributed.launch``: one data-parallel SGD step per dtype, with and without
synchronised BatchNorm, on its shard of one seeded global batch of the parity case.

``python -m tests.distributed_worker BACKEND OUT_DIR DTYPE[,DTYPE]`` writes, per worker and case,
``{rank}-{dtype}-{sync|local}.npz`` (the weights after the step, and the loss), the refusal
message instead where the engine has no synchronised BatchNorm, and, on worker 0, the
single-process step of the same backend on the whole batch (``single-{dtype}.npz``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from common.distributed import SyncBatchNormUnavailable, connect, shard_range
from common.harness import seeded_batches
from common.parity import PARITY_CASE
from common.registry import load_backend
from common.weights import init_canonical

CONFIG, SIZE, BATCH, LR, SEED = PARITY_CASE, (16, 16), 4, 0.01, 0


def main(backend: str, out: Path, dtypes: list[str], single: bool = False) -> None:
    group = connect(backend)
    adapter = load_backend(backend)
    X, y = seeded_batches(CONFIG, SIZE, BATCH, 1, SEED)[0]
    w0 = init_canonical(CONFIG, SEED)
    start, stop = shard_range(BATCH, group.rank, group.world)
    notes = {"rank": group.rank, "world": group.world, "replicas": group.replicas}
    totals = group.sum(np.array([group.rank + 1.0, 1.0]))
    notes["sum"] = totals.tolist()
    for dtype in dtypes:
        for sync in (False, True):
            case = f"{dtype}-{'sync' if sync else 'local'}"
            try:
                model = group.build(adapter, CONFIG, seed=SEED, dtype=dtype, sync_bn=sync)
            except SyncBatchNormUnavailable as exc:
                notes[case] = str(exc)
                continue
            group.set_weights(adapter, model, w0)
            loss, logits = group.train_step(adapter, model, X[start:stop], y[start:stop], LR)
            weights = group.get_weights(adapter, model)
            np.savez(out / f"{group.rank}-{case}.npz", loss=np.array(loss), logits=logits, **weights)
        if single and group.writer:
            model = adapter.build(CONFIG, seed=SEED, dtype=dtype)
            adapter.set_weights(model, w0)
            loss, _ = adapter.train_step(model, X, y, LR)
            np.savez(out / f"single-{dtype}.npz", loss=np.array(loss), **adapter.get_weights(model))
    (out / f"notes-{group.rank}.json").write_text(json.dumps(notes))
    group.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), single="--single" in sys.argv)
