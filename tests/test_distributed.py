"""Data-parallel training on each framework's own engine (docs/distributed.md).

One launch per backend runs 2 workers of ``tests/distributed_worker.py`` (one step per dtype,
with and without --sync-bn, then two momentum steps and one restored from saved velocities);
the assertions share it. A 2-worker ``densenet train`` with momentum is resumed once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.distributed import launch, shard_batches, shard_range
from common.distributed.launch import namespace_available
from common.distributed.sharding import ShardingError
from common.oracle import reference_grad
from common.training.optim import FOLDED_LR, MOMENTUM_BUFFER, SGD, SUITE, Convention, sgd_update, state_spec
from common.verify.harness import seeded_batches
from common.verify.parity import bound
from common.weights.canonical import init_canonical, load_canonical
from tests.distributed_worker import BATCH, CONFIG, LR, LRS, MOMENTUM, SEED, SIZE
from tests.helpers import get_adapter, run_cli

pytestmark = pytest.mark.distributed

# float64 where the engine carries it (MXNet's dist_sync kvstore does not); JAX's step test runs
# in float32 only, to keep its compilations within the time budget (docs/distributed.md).
DTYPES = {"torch": "float32,float64", "jax": "float32", "tf": "float32,float64", "mxnet": "float32"}
# Engines without a BatchNorm synchronised across processes: --sync-bn is refused, with this text.
NO_SYNC_BN = {"torch": "SyncBatchNorm runs on GPUs only", "mxnet": "never across dist_sync kvstore processes"}
TIMEOUT_S = 240


def _loopback_only(backend: str) -> None:
    """TensorFlow's gRPC servers bind every interface; its tests run only where the launcher can
    give the job a private network namespace, in which loopback is the only interface."""
    if backend == "tf" and not namespace_available():
        pytest.skip("TensorFlow's workers would listen beyond loopback: `unshare -rn` is not available here")


PLAIN = SGD()


def _max_abs(w: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.max(np.abs(v))) if np.size(v) else 0.0 for k, v in w.items()}


def oracle(
    shards: int,
    sgd: SGD = PLAIN,
    lrs: tuple[float, ...] = (LR,),
    convention: Convention = SUITE,
    forget_velocity: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, float], list[float]]:
    """The float64 numpy steps of ``sgd`` (``common.training.optim.sgd_update``), one per seeded global
    batch at the rates ``lrs``, BatchNorm statistics taken per shard (``shards`` equal shards; 1:
    the single-process steps), gradients and running statistics averaged over the shards: the
    weights and velocities after the last step, the scale of each (as common.verify.parity's step checks)
    and the global mean loss of each step. ``forget_velocity``: the velocities are dropped before
    the last step (a resume that lost them)."""
    batches = seeded_batches(CONFIG, SIZE, BATCH, len(lrs), SEED)
    w = {k: np.asarray(v, np.float64) for k, v in init_canonical(CONFIG, SEED).items()}
    velocity: dict[str, np.ndarray] = {}
    losses, velocity_scales = [], {}
    for step, ((X, y), lr) in enumerate(zip(batches, lrs)):
        if forget_velocity and step == len(lrs) - 1:
            velocity = {}
        parts = [
            reference_grad.loss_and_grads(CONFIG, w, X[a:b], y[a:b])
            for a, b in (shard_range(BATCH, r, shards) for r in range(shards))
        ]
        for k in parts[0].params:
            old = velocity.get(k)
            # The velocity adds momentum * old, the averaged gradient and the decay term.
            velocity_scales[k + MOMENTUM_BUFFER] = float(
                sgd.momentum * (np.max(np.abs(old)) if old is not None else 0.0)
                + np.mean([g.param_scales[k] for g in parts])
                + sgd.weight_decay * np.max(np.abs(w[k]))
            )
            w[k], new = sgd_update(w[k], np.mean([g.params[k] for g in parts], axis=0), old, lr, sgd, convention)
            if new is not None:
                velocity[k] = new
        stats = {k: np.mean([g.stats[k] for g in parts], axis=0) for k in parts[0].stats}
        stat_scales = {k: max(g.stat_scales[k] for g in parts) for k in stats}
        w.update(stats)
        losses.append(float(np.mean([g.loss for g in parts])))
    scales = {**_max_abs({k: v for k, v in w.items() if k not in stats}), **stat_scales}
    if velocity:
        scales.update(velocity_scales)
    return {**w, **{k + MOMENTUM_BUFFER: v for k, v in velocity.items()}}, scales, losses


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


def test_a_worker_killed_by_a_signal_is_named_with_it():
    # Worker 1 kills itself outright; worker 0 would wait a minute.
    code = "import os, time; os.kill(os.getpid(), 9) if os.environ['RANK'] == '1' else time.sleep(60)"
    notes = []
    status = launch("torch", [sys.executable, "-c", code], 2, timeout_s=60, say=notes.append)
    assert status == -9 and notes == ["worker 1 died (killed by SIGKILL); stopping the other workers"]


def test_an_engine_error_for_a_vanished_peer_is_one_clear_line():
    """A collective that fails because another worker went away is PeerLost (exit 1, one line),
    an error of the worker's own stays what it is, and after this worker was interrupted the
    interrupt wins (the peers left because of it)."""
    from common.distributed import PeerLost, group
    from common.process import lifeline

    class Fake(group.Group):
        backend, rank, world, replicas = "fake", 0, 2, 2
        build = train_step = set_weights = get_weights = forward = sum = close = None  # type: ignore[assignment]

        def peer_gone(self, exc):
            return group.telling_line(str(exc), "peer") if "gloo" in str(exc) else None

        @group.collective
        def step(self, error: Exception):
            raise error

    vanished = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1. Check it.")
    with pytest.raises(PeerLost) as caught:
        Fake().step(vanished)
    assert str(caught.value) == (
        "worker 0: another worker of the group is gone (Connection closed by peer [127.0.0.1]:1); this one stops too"
    )
    assert caught.value.exit_status == 1
    with pytest.raises(ValueError, match="own"):
        Fake().step(ValueError("its own"))
    with lifeline.interrupts(), pytest.raises(lifeline.Interrupt):
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # as the launcher passes Ctrl-C on
            time.sleep(10)
        Fake().step(RuntimeError("MISMATCH of original and normalized active exception types"))


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
                _loopback_only(backend)
                result = launch(backend, command, 2, timeout_s=TIMEOUT_S, namespace=backend == "tf" or None)
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
    per_shard, per_shard_scales, (per_shard_loss,) = oracle(2)
    whole, whole_scales, (whole_loss,) = oracle(1)
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


def test_data_parallel_momentum_steps_equal_the_oracle_and_resume(backend_name, adapter, steps):
    """Two steps of Nesterov momentum with weight decay at two rates (tests/distributed_worker.py:
    MOMENTUM, LRS) on 2 workers: weights, running statistics and velocities on every worker equal
    the float64 oracle with per-shard BatchNorm statistics, within the ``nesterov-step`` bound;
    and the last step, taken again by a fresh optimiser given the weights and velocities saved
    before it (group.set_optimizer_state, as --resume does), lands on the same numbers."""
    out = steps(backend_name)
    world = json.loads((out / "notes-0.json").read_text())["world"]
    expected, scales, losses = oracle(2, MOMENTUM, LRS)
    assert len(state_spec(CONFIG, MOMENTUM)) == sum(k.endswith(MOMENTUM_BUFFER) for k in expected)
    dtypes = DTYPES[backend_name].split(",")
    for dtype in dtypes:
        limit = bound("nesterov-step", dtype)
        for rank in range(world):
            got = dict(np.load(out / f"{rank}-{dtype}-momentum.npz"))
            assert set(got) == {*expected, "loss"}
            error, worst = relative_error(got, expected, scales)
            assert error <= limit, f"{dtype} worker {rank}: {worst} off by {error:.3g} > {limit:.3g}"
            assert np.allclose(got["loss"], losses, rtol=limit, atol=0)
    limit = bound("nesterov-step", dtypes[0])
    for rank in range(world):
        got = dict(np.load(out / f"{rank}-{dtypes[0]}-restored.npz"))
        error, worst = relative_error(got, expected, scales)
        assert error <= limit, f"restored velocities, worker {rank}: {worst} off by {error:.3g} > {limit:.3g}"
    # The test can tell the suite's SGD from the frameworks' own readings of the same words and
    # from a resume that lost the velocities or the weight decay.
    for other in (
        oracle(2, MOMENTUM, LRS, FOLDED_LR),
        oracle(2, SGD(MOMENTUM.momentum, MOMENTUM.nesterov), LRS),
        oracle(2, MOMENTUM, LRS, forget_velocity=True),
    ):
        assert relative_error(other[0], expected, scales)[0] > 100 * bound("nesterov-step", "float32")


# --- one launch per backend: a 2-worker densenet train ------------------------------------------

# The optimiser of the CLI runs (tests/distributed_worker.py's MOMENTUM).
MOMENTUM_OPTIONS = ("--momentum", "0.9", "--nesterov", "--weight-decay", "5e-3")


def _train_argv(backend: str, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "train", "--backend", backend, "--workers", "2", "--arch", "2,2", "--num-channels", "16",
        "--growth-rate", "16", "--resize", "16", "--batch-size", "16", "--limit", "256", "--test-limit", "128",
        "--epochs", str(epochs), *MOMENTUM_OPTIONS, "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def _train(capsys, *argv: str) -> None:
    _loopback_only(argv[argv.index("--backend") + 1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSENET_DIST_TIMEOUT", "120")  # every rendezvous and collective
        mp.setenv("DENSENET_DIST_JOB_TIMEOUT", str(TIMEOUT_S))  # the whole job, then killed
        code, _, err = run_cli(capsys, *argv)
    assert code == 0, err


@pytest.fixture(scope="module")
def one_epoch_runs(tmp_path_factory):
    """Per backend, the run directory of one 2-worker momentum ``densenet train`` of one epoch."""
    done: dict[str, Path] = {}

    def run(backend: str, capsys) -> Path:
        if backend not in done:
            out = tmp_path_factory.mktemp(f"run-{backend}") / "run"
            _train(capsys, *_train_argv(backend, out, 1))
            done[backend] = out
        return done[backend]

    return run


def test_a_two_worker_run_writes_one_run_that_any_backend_evaluates(backend_name, adapter, one_epoch_runs, capsys):
    out = one_epoch_runs(backend_name, capsys)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.safetensors", "curves.png", "metrics.jsonl", "run.json", "steps.jsonl", "weights.safetensors",
    ]  # fmt: skip
    assert not [p for p in out.parent.iterdir() if p != out]  # no stray files beside it
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["workers"] == 2 and settings["batch_size"] == 16
    assert (settings["momentum"], settings["nesterov"], settings["weight_decay"]) == (0.9, True, 5e-3)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and np.isfinite(metrics[0]["train_loss"])
    # Worker 0's checkpoint holds every velocity, as a single-process run's does.
    checkpoint = load_canonical(out / "checkpoint.safetensors")
    velocities = checkpoint.optimizer_state
    assert sorted(velocities) == sorted(state_spec(checkpoint.config, MOMENTUM))
    assert all(np.all(np.isfinite(v)) for v in velocities.values())
    assert all(np.any(v != 0) for k, v in velocities.items() if not k.startswith("stem.conv.bias"))
    # The weights in PyTorch (any backend loads them): the accuracy worker 0 recorded, evaluated sharded.
    code, text, err = run_cli(
        capsys, "evaluate", "--weights", out / "weights.safetensors", "--backend", "torch", "--limit", "128", "--json"
    )
    assert code == 0, err
    assert abs(json.loads(text)["test_acc"] - metrics[0]["test_acc"]) <= 1 / 128


@pytest.mark.mxnet
def test_a_resumed_two_worker_momentum_run_continues_as_if_uninterrupted(request, one_epoch_runs, tmp_path, capsys):
    """``--resume`` of a 2-worker momentum run (every worker loads worker 0's velocities) for a
    second epoch gives the weights and velocities of an uninterrupted 2-epoch run. On MXNet only:
    the fastest engine to launch; what differs per engine, loading saved velocities into a fresh
    optimiser on every worker, is checked on all four by the momentum step test."""
    get_adapter("mxnet", request.config)
    resumed = tmp_path / "resumed"
    shutil.copytree(one_epoch_runs("mxnet", capsys), resumed)
    _train(capsys, *_train_argv("mxnet", resumed, 2, "--resume"))
    _train(capsys, *_train_argv("mxnet", tmp_path / "whole", 2))
    a = load_canonical(resumed / "checkpoint.safetensors")
    b = load_canonical(tmp_path / "whole" / "checkpoint.safetensors")
    assert a.metadata["epoch"] == b.metadata["epoch"] == "2"
    for k in {**b.weights, **b.optimizer_state}:
        x, y = {**a.weights, **a.optimizer_state}[k], {**b.weights, **b.optimizer_state}[k]
        assert np.array_equal(x, y), f"{k}: resumed differs by {np.max(np.abs(x - y)):.3g}"
