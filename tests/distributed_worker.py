"""A worker of the distributed step tests (``tests/test_distributed.py``), started by
``common.distributed.launch``: one data-parallel plain SGD step per dtype, with and without
synchronised BatchNorm, on its shard of one seeded global batch of the parity case; then, on the
model without synchronised BatchNorm, two steps of ``MOMENTUM`` at the rates ``LRS`` on two
seeded global batches.

``python -m tests.distributed_worker BACKEND OUT_DIR DTYPE[,DTYPE]`` writes, per worker and case,
``{rank}-{dtype}-{sync|local}.npz`` (the weights after the step, and the loss), the refusal
message instead where the engine has no synchronised BatchNorm, ``{rank}-{dtype}-momentum.npz``
(the weights and velocities after the two momentum steps, and their losses), for the first dtype
``{rank}-{dtype}-restored.npz`` (the last momentum step again, on a fresh optimiser given the
weights and velocities saved before it, as ``--resume`` does) and, on worker 0, the
single-process step of the same backend on the whole batch (``single-{dtype}.npz``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from common.distributed import SyncBatchNormUnavailable, connect, shard_range
from common.registry import load_backend
from common.training.optim import SGD
from common.verify.harness import seeded_batches
from common.verify.parity import PARITY_CASE
from common.weights.canonical import init_canonical

CONFIG, SIZE, BATCH, LR, SEED = PARITY_CASE, (16, 16), 4, 0.01, 0
# The momentum steps: Nesterov with a weight decay that weighs in (5e-3: removing it moves the
# weights thousands of times the float32 bound), at two rates (the frameworks' conventions for the
# rate in the velocity part when it changes).
MOMENTUM, LRS = SGD(momentum=0.9, nesterov=True, weight_decay=5e-3), (LR, LR / 2)


def main(backend: str, out: Path, dtypes: list[str], single: bool = False) -> None:
    group = connect(backend)
    adapter = load_backend(backend)
    batches = seeded_batches(CONFIG, SIZE, BATCH, len(LRS), SEED)
    X, y = batches[0]
    w0 = init_canonical(CONFIG, SEED)
    start, stop = shard_range(BATCH, group.rank, group.world)
    notes = {"rank": group.rank, "world": group.world, "replicas": group.replicas}
    totals = group.sum(np.array([group.rank + 1.0, 1.0]))
    notes["sum"] = totals.tolist()
    for dtype in dtypes:
        local = None
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
            local = model if not sync else local
        # The same model again (MXNet allows one per process), from w0 with zero velocities.
        group.set_weights(adapter, local, w0)
        adapter.configure_optimizer(local, MOMENTUM)
        losses = []
        for step, ((Xb, yb), lr) in enumerate(zip(batches, LRS)):
            if step == len(LRS) - 1:  # what a checkpoint holds before the last step
                before = group.get_weights(adapter, local), group.get_optimizer_state(adapter, local)
            losses.append(group.train_step(adapter, local, Xb[start:stop], yb[start:stop], lr)[0])
        after = {**group.get_weights(adapter, local), **group.get_optimizer_state(adapter, local)}
        np.savez(out / f"{group.rank}-{dtype}-momentum.npz", loss=np.array(losses), **after)
        if dtype == dtypes[0]:  # a fresh optimiser given the saved state, as --resume does
            adapter.configure_optimizer(local, MOMENTUM)
            group.set_weights(adapter, local, before[0])
            group.set_optimizer_state(adapter, local, before[1])
            (Xb, yb), lr = batches[-1], LRS[-1]
            loss, _ = group.train_step(adapter, local, Xb[start:stop], yb[start:stop], lr)
            after = {**group.get_weights(adapter, local), **group.get_optimizer_state(adapter, local)}
            np.savez(out / f"{group.rank}-{dtype}-restored.npz", loss=np.array(loss), **after)
        if single and group.writer:
            model = adapter.build(CONFIG, seed=SEED, dtype=dtype)
            adapter.set_weights(model, w0)
            loss, _ = adapter.train_step(model, X, y, LR)
            np.savez(out / f"single-{dtype}.npz", loss=np.array(loss), **adapter.get_weights(model))
    (out / f"notes-{group.rank}.json").write_text(json.dumps(notes))
    group.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), single="--single" in sys.argv)
