"""``--threads N``: every framework computes with N threads, set up before any of them loads.

The proof is behavioural: a fresh process runs a command with ``--threads``, then reads the
count back from the framework's own API (where it has one) and counts the threads of the
process that did the computing of a forward pass (from ``/proc``), for each backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common.cli
from common.cli import build_parser
from common.cli.options import THREADED
from common.errors import InputError
from common.process import threads
from tests.helpers import get_adapter, run_cli

ROOT = Path(common.cli.__file__).parents[2]  # so a fresh process imports this checkout's packages

# A child process: `densenet compare --threads N` through the CLI's main (which sets the count
# up before compare imports the framework), then the framework's own word on its pools, the
# count a grandchild inherits, and the threads that did the work of a few forward passes.
_CHILD = r"""
import contextlib, io, json, os, subprocess, sys, time
import numpy as np
from common.cli import main
from common.config import DenseNetConfig
from common.registry import load_backend

name, n = sys.argv[1], sys.argv[2]
with contextlib.redirect_stdout(io.StringIO()):
    code = main(["compare", "--threads", n, "--backends", name, "--input-size", "32"])
assert code == 0, f"compare exited {code}"

reported = {}
if name == "torch":
    import torch
    reported = {"intra": torch.get_num_threads(), "inter": torch.get_num_interop_threads()}
elif name == "tf":
    import tensorflow as tf
    reported = {
        "intra": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter": tf.config.threading.get_inter_op_parallelism_threads(),
    }
inherited = subprocess.run(
    [sys.executable, "-c", "from common.process import threads; print(threads.current())"],
    capture_output=True, text=True, check=True,
).stdout.strip()


def ticks():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return out


adapter = load_backend(name)
model = adapter.build(DenseNetConfig(), seed=0)
X = np.random.default_rng(0).random((16, 1, 64, 64), dtype=np.float32)
adapter.forward(model, X)  # compiling or tracing, if any, before the count
before, start = ticks(), time.perf_counter()
while True:
    adapter.forward(model, X)
    used = {t: c - before.get(t, 0) for t, c in ticks().items()}
    if sum(used.values()) >= 150 or time.perf_counter() - start > 60:
        break
main = used.pop(str(os.getpid()), 0)  # the Python thread's share, apart (see the test)
others = sorted((c for c in used.values() if c > 0), reverse=True)
print(json.dumps({"reported": reported, "inherited": inherited, "main": main, "others": others,
                  "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "PJRT_NPROC", "TF_NUM_INTRAOP_THREADS",
                                                         "MXNET_CPU_WORKER_NTHREADS")}}))
"""


def _child(name: str, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in threads.POOLS and k not in (threads.ENV, *threads.FIXED)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, name, str(n)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_threads_reach_every_framework(backend_name: str, request: pytest.FixtureRequest) -> None:
    get_adapter(backend_name, request.config)  # skipped (or failed, if required) where it cannot load
    one = _child(backend_name, 1)
    assert one["inherited"] == "1", one  # a child process computes with the same count
    assert set(one["reported"].values()) <= {1}, one  # PyTorch's and TensorFlow's own API
    assert one["env"]["OMP_NUM_THREADS"] == "1" and one["env"]["PJRT_NPROC"] == "1", one
    assert one["env"]["MXNET_CPU_WORKER_NTHREADS"] == "1", one
    # One thread did the work. Beside it, at most a thread that feeds it: the Python thread
    # queueing work for MXNet's engine or JAX's runtime, or a JAX helper, which did 8-17% of the
    # work (measured) and stayed there with the process pinned to one core (taskset -c 0), so
    # that is work taking turns, not computing at once. Without --threads, two threads each did
    # about half on the 2-core development machine in every framework but MXNet.
    total = one["main"] + sum(one["others"])
    quarters = sum(c >= 0.25 * total for c in [one["main"], *one["others"]])
    assert quarters == 1, f"{backend_name} computed on several threads with --threads 1: {one}"
    if threads.default_threads() < 2:
        return
    # The count is the framework's to honour, not an accident of the machine: with two, two work.
    # The Python thread counts where it computes (PyTorch's and TensorFlow's eager kernels run on
    # it: half the work or more), not where it only queues work (MXNet, JAX).
    two = _child(backend_name, 2)
    assert set(two["reported"].values()) <= {2}, two
    total = two["main"] + sum(two["others"])
    computing = [*two["others"], *([two["main"]] if two["main"] >= 0.25 * total else [])]
    assert sum(c >= 0.1 * total for c in computing) >= 2, f"{backend_name}: one thread with --threads 2: {two}"


def test_environment_sets_every_pool_for_all_frameworks_at_once() -> None:
    env = threads.environment(3)
    assert env[threads.ENV] == "3"
    assert all(env[var] == "3" for var in threads.POOLS)
    assert env["MXNET_CPU_WORKER_NTHREADS"] == "1"  # N workers would each run N OpenMP threads
    with pytest.raises(InputError, match="expected a thread count from 1 to 1024, got 0"):
        threads.environment(0)


def test_count_is_given_else_inherited_else_exported_else_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert threads.resolve(None) == 3 and threads.current() == 3
    assert threads.resolve(5) == 5
    for value, expected in (("1", 1), ("4,2", 4), ("lots", 3), ("0", 3)):  # an exported count holds for all
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert threads.resolve(None) == expected, value
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.resolve(None) == 2 and threads.resolve(7) == 7
    monkeypatch.setenv(threads.ENV, "two")
    with pytest.raises(InputError, match=r"DENSENET_THREADS='two': expected a thread count from 1 to 1024"):
        threads.current()
    for var in (*threads.POOLS, *threads.FIXED):
        monkeypatch.setenv(var, "99")
    assert threads.apply(4) == 4
    assert os.environ[threads.ENV] == "4" and os.environ["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize("value", ["0", "x", "-1", "1.5", "1025", ""])
def test_bad_thread_counts_are_refused(capsys: pytest.CaptureFixture[str], value: str) -> None:
    code, _, err = run_cli(capsys, "compare", "--threads", value)
    assert code == 2
    assert f"argument --threads: expected a thread count from 1 to 1024, got {value!r}" in err, err


def test_every_computing_command_takes_threads() -> None:
    required = {
        "summary": ["--backend", "torch"],
        "train": ["--backend", "torch"],
        "evaluate": ["--backend", "torch", "--weights", "w.safetensors"],
        "teach": ["--out", "site"],
        "convert": ["--from", "a.npz", "--to", "b.npz"],
        "export": ["--backend", "torch", "--weights", "w.safetensors", "--out", "e"],
    }
    for path in THREADED:
        args = build_parser().parse_args([*path.split(), "--threads", "2", *required.get(path, [])])
        assert args.threads == 2 and args.apply_threads, path
    # parity-sweep keeps its own --threads: the counts to sweep, each in a process set up by the table.
    sweep = build_parser().parse_args(["parity-sweep", "--threads", "1,2"])
    assert sweep.threads == [1, 2] and not getattr(sweep, "apply_threads", False)


def test_a_bad_inherited_count_is_one_clear_error() -> None:
    """What a person sees with a broken DENSENET_THREADS: exit 2, one line, before any framework loads."""
    env = {**os.environ, threads.ENV: "lots", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "common", "summary", "--backend", "torch"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "densenet summary: error: DENSENET_THREADS='lots': expected a thread count from 1 to 1024, got 'lots' "
        "(unset it or pass --threads)"
    )
