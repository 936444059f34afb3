"""Data-parallel training on each framework's own engine (docs/distributed.md).

One launch per backend runs 2 workers of ``tests/distributed_worker.py`` (one step per dtype,
with and without --sync-bn) and a 2-worker ``densenet train``; the assertions share it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import reference_grad
from common.distributed import launch, shard_batches, shard_range
from common.distributed.sharding import ShardingError
from common.harness import seeded_batches
from common.parity import bound
from common.weights import init_canonical
from tests.distributed_worker import BATCH, CONFIG, LR, SEED, SIZE

pytestmark = pytest.mark.distributed

# float64 where the engine carries it (MXNet's dist_sync kvstore does not); JAX's step test runs
# in float32 only, to keep its compilations within the time budget (docs/distributed.md).
DTYPES = {"torch": "float32,float64", "jax": "float32", "tf": "float32,float64", "mxnet": "float32"}
# Engines without a BatchNorm synchronised across processes: --sync-bn is refused, with this text.
NO_SYNC_BN = {"torch": "SyncBatchNorm runs on GPUs only", "mxnet": "never across dist_sync kvstore processes"}
TIMEOUT_S = 240


def _max_abs(w: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.max(np.abs(v))) if np.size(v) else 0.0 for k, v in w.items()}


def oracle_step(shards: int) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
    """The float64 numpy step on the seeded global batch, BatchNorm statistics taken per shard
    (``shards`` equal shards; 1: the single-process step): the weights after it, the scale of each
    tensor (as common.parity's sgd-step check) and the global mean loss."""
    X, y = seeded_batches(CONFIG, SIZE, BATCH, 1, SEED)[0]
    w0 = init_canonical(CONFIG, SEED)
    parts = [
        reference_grad.loss_and_grads(CONFIG, w0, X[a:b], y[a:b])
        for a, b in (shard_range(BATCH, r, shards) for r in range(shards))
    ]
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


# --- framework-free ------------------------------------------------------------------------


def test_the_workers_shards_make_up_the_single_process_batches():
    order = np.random.default_rng(0).permutation(21)
    single = [order[i : i + 8] for i in range(0, 21, 8)]
    shards = [list(shard_batches(order, 8, r, 2)) for r in range(2)]
    assert [len(s) for s in shards[0]] == [4, 4, 2]  # the last batch (5 images) loses one
    for step, batch in enumerate(single):
        joined = np.concatenate([shards[0][step], shards[1][step]])
        assert np.array_equal(joined, batch[: len(joined)]) and len(batch) - len(joined) < 2
    with pytest.raises(ShardingError, match="multiple of 3"):
        list(shard_batches(order, 8, 0, 3))
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_one_failing_worker_stops_the_others_and_nothing_is_left(tmp_path: Path):
    # Worker 1 writes its pid and would sleep a minute; worker 0 fails once that pid is there.
    code = (
        "import os, sys, time; from pathlib import Path; r = int(os.environ['RANK']); "
        f"d = Path(r'{tmp_path}'); (d / 'pid.tmp').write_text(str(os.getpid())) if r else None; "
        "os.replace(d / 'pid.tmp', d / 'pid1') if r else None; "
        "[time.sleep(0.05) for _ in range(400) if not (d / 'pid1').exists()] if r == 0 else None; "
        "sys.exit(3) if r == 0 else time.sleep(60)"
    )
    started = time.monotonic()
    status = launch("torch", [sys.executable, "-c", code], 2, timeout_s=60, say=lambda m: None)
    assert status == 3 and time.monotonic() - started < 30
    pid = int((tmp_path / "pid1").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_hung_job_is_stopped_at_its_timeout():
    started = time.monotonic()
    notes = []
    status = launch("torch", [sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout_s=2, say=notes.append)
    assert status == 124 and time.monotonic() - started < 20 and "did not finish within 2 s" in notes[0]


# --- one launch per backend: the steps --------------------------------------------------------


@pytest.fixture(scope="module")
def steps(tmp_path_factory, request):
    """Per backend, the files of one 2-worker launch of tests/distributed_worker.py."""
    done: dict[str, Path] = {}

    def run(backend: str) -> Path:
        if backend not in done:
            out = tmp_path_factory.mktemp(f"steps-{backend}")
            command = [sys.executable, "-m", "tests.distributed_worker", backend, str(out), DTYPES[backend]]
            if backend == "jax":  # several host devices in one process (the 2-process path: the run test)
                env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(Path.cwd())}
                result = _run(command, env)
            else:
                result = launch(backend, command, 2, timeout_s=TIMEOUT_S)
            assert result == 0, f"{backend} workers failed (status {result})"
            done[backend] = out
        return done[backend]

    return run


def _run(command: list[str], env: dict[str, str]) -> int:
    import subprocess

    proc = subprocess.Popen(command, env=os.environ | env, start_new_session=True)
    try:
        return proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_a_data_parallel_step_equals_the_single_process_step(backend_name, adapter, steps):
    out = steps(backend_name)
    notes = json.loads((out / "notes-0.json").read_text())
    assert notes["sum"] == [sum(range(1, notes["world"] + 1)), notes["world"]]
    assert notes["replicas"] == 2
    per_shard, per_shard_scales, per_shard_loss = oracle_step(2)
    whole, whole_scales, whole_loss = oracle_step(1)
    ranks = range(notes["world"])
    for dtype in DTYPES[backend_name].split(","):
        limit = bound("sgd-step", dtype)
        # Without --sync-bn: the oracle with each shard's BatchNorm statistics, on every worker.
        for rank in ranks:
            w = dict(np.load(out / f"{rank}-{dtype}-local.npz"))
            error, worst = relative_error(w, per_shard, per_shard_scales)
            assert error <= limit, f"{dtype} per-shard BN, worker {rank}: {worst} off by {error:.3g} > {limit:.3g}"
            assert abs(float(w["loss"]) - per_shard_loss) <= limit * per_shard_loss
        # With --sync-bn: the single-process step on the whole batch, or a clear refusal.
        if backend_name in NO_SYNC_BN:
            assert NO_SYNC_BN[backend_name] in notes[f"{dtype}-sync"]
            continue
        for rank in ranks:
            w = dict(np.load(out / f"{rank}-{dtype}-sync.npz"))
            error, worst = relative_error(w, whole, whole_scales)
            assert error <= limit, f"{dtype} sync BN, worker {rank}: {worst} off by {error:.3g} > {limit:.3g}"
            assert abs(float(w["loss"]) - whole_loss) <= limit * whole_loss
        # Per-shard statistics really differ from the global ones (the test can tell them apart).
        assert relative_error(per_shard, whole, whole_scales)[0] > 1000 * limit


# --- one launch per backend: a 2-worker densenet train ------------------------------------------


def test_a_two_worker_run_writes_one_run_that_any_backend_evaluates(
    backend_name, adapter, tmp_path, capsys, monkeypatch
):
    from tests.helpers import run_cli

    out = tmp_path / "run"
    argv = [
        "train", "--backend", backend_name, "--workers", "2", "--arch", "2,2", "--num-channels", "16",
        "--growth-rate", "16", "--resize", "16", "--batch-size", "16", "--limit", "256", "--test-limit", "128",
        "--epochs", "1", "--quiet", "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setenv("DENSENET_DIST_TIMEOUT", "120")  # every rendezvous and collective
    monkeypatch.setenv("DENSENET_DIST_JOB_TIMEOUT", str(TIMEOUT_S))  # the whole job, then killed
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.safetensors", "curves.png", "metrics.jsonl", "run.json", "steps.jsonl", "weights.safetensors",
    ]  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p != out]  # no stray files beside it
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["workers"] == 2 and settings["batch_size"] == 16
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and np.isfinite(metrics[0]["train_loss"])
    # The weights in PyTorch (any backend loads them): the accuracy worker 0 recorded, evaluated sharded.
    code, text, err = run_cli(
        capsys, "evaluate", "--weights", out / "weights.safetensors", "--backend", "torch", "--limit", "128", "--json"
    )
    assert code == 0, err
    assert abs(json.loads(text)["test_acc"] - metrics[0]["test_acc"]) <= 1 / 128
