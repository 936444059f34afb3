"""Stopping a command by any signal leaves no process behind and nothing writing (issue 24).

``densenet train --workers 2`` on each engine, once it trains (its first epoch is saved), gets
SIGTERM, SIGHUP or SIGKILL in its main process: within a bounded time no process of the run is
left (the whole tree, captured before the signal, since orphans would be adopted by PID 1) and
nothing is written to the run directory after the signal. SIGTERM and SIGHUP stop it as Ctrl-C
does (exit 143 and 129). A worker killed outright makes the run fail with one clear line naming
it, and exit 1, not an internal error. ``densenet bench`` takes its case's child process with it
the same way; single-process ``densenet train`` stops on SIGTERM and SIGHUP as on Ctrl-C.

The runs are tiny (a 1,1 network of 8 channels at 16x16, 256 images an epoch) and every process a
test starts is killed in a ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.distributed.launch import GRACE_S
from tests.helpers import get_adapter
from tests.test_distributed import _loopback_only

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process trees read from /proc: Linux"),
]

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "--arch", "1,1", "--growth-rate", "8", "--num-channels", "8", "--resize", "16", "--batch-size", "32",
    "--limit", "256", "--test-limit", "32", "--quiet",
)  # fmt: skip
START_S = 240  # starting the workers and training the first epoch, on 2 busy cores
# Every process of the run ends within this after the signal: the workers' grace to stop by
# themselves (GRACE_S), then they are killed.
GONE_S = 2 * GRACE_S
# A write already under way when the signal came may land this much later; nothing after it.
SLACK_S = 1.0
QUIET_S = 2.0  # and the directory stays as it is this long after the last process ended
SIGNALS = [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGHUP, id="SIGHUP"),
    pytest.param(signal.SIGKILL, id="SIGKILL"),
]


# --- processes, from /proc ----------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, str] | None:
    """``(ppid, state, start time)`` of ``pid``, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), fields[0], fields[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def tree(root: int) -> dict[int, tuple[str, str]]:
    """Every process under ``root`` (``root`` included): pid -> (start time, command line)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is not None:
            found[pid] = (stat[2], _cmdline(pid))
            todo += children.get(pid, [])
    return found


def alive(procs: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Those of ``procs`` still running: the same pid and start time, not a zombie."""
    out = {}
    for pid, (start, cmd) in procs.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[1] != "Z":
            out[pid] = cmd
    return out


def wait_gone(procs: dict[int, tuple[str, str]], seconds: float) -> dict[int, str]:
    deadline = time.monotonic() + seconds
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(procs)


def files(directory: Path) -> dict[str, tuple[int, int]]:
    """The run's files (not the lock's bookkeeping): name -> (size, mtime in ns)."""
    if not directory.is_dir():
        return {}
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if not p.name.startswith(".")}


class Command:
    """``densenet ARGV`` started in a session of its own, its output in files; ``stop()`` kills
    everything it started, whatever the test did."""

    def __init__(self, tmp: Path, *argv: str, env: dict[str, str] | None = None) -> None:
        self.err_path = tmp / "stderr.txt"
        self.tracked: dict[int, tuple[str, str]] = {}
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DENSENET_DIST_TIMEOUT": "60",  # every rendezvous and collective
            "DENSENET_DIST_JOB_TIMEOUT": str(START_S + 60),  # the launcher ends the whole job then
            **(env or {}),
        }
        with open(tmp / "stdout.txt", "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "common", *argv],
                stdout=out,
                stderr=err,
                env=env,
                cwd=tmp,
                start_new_session=True,  # the test's own signals never reach it by accident
            )

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, condition, what: str, seconds: float = START_S) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {seconds:g} s:\n{self.stderr[-3000:]}"
            time.sleep(0.1)

    def capture(self) -> dict[int, tuple[str, str]]:
        """The process tree now; remembered for stop()."""
        self.tracked = tree(self.proc.pid)
        return self.tracked

    def stop(self) -> None:
        for pid in alive({**self.tracked, **tree(self.proc.pid)}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def workers(procs: dict[int, tuple[str, str]]) -> list[int]:
    """The workers' pids, in the order the launcher started them (worker 0 first). (TensorFlow's
    launcher inside its namespace, ``-m common.distributed ... -- COMMAND``, is not one.)"""
    found = [
        p
        for p, (_, cmd) in procs.items()
        if cmd.rstrip().endswith("--distributed") and "-m common train" in cmd and "-m common.distributed" not in cmd
    ]
    return sorted(found, key=lambda p: (int(procs[p][0]), p))


def _train(tmp: Path, backend: str, *extra: str) -> tuple[Command, Path]:
    out = tmp / "run"
    return Command(tmp, "train", "--backend", backend, *TINY, "--epochs", "1000", "--out", str(out), *extra), out


def _training(out: Path):
    return lambda: (out / "checkpoint.safetensors").is_file()  # an epoch is done and saved


# --- densenet train --workers 2 --------------------------------------------------------------------


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_to_a_distributed_run_leaves_no_process_and_no_writer(backend_name, request, tmp_path, signum):
    get_adapter(backend_name, request.config)
    _loopback_only(backend_name)
    run, out = _train(tmp_path, backend_name, "--workers", "2")
    try:
        run.wait_for(_training(out), "first epoch")
        procs = run.capture()
        assert len(workers(procs)) == 2, procs
        sent = time.time()
        os.kill(run.proc.pid, signum)
        left = wait_gone(procs, GONE_S)
        assert not left, f"left running {GONE_S:g} s after {signum.name}: {left}"
        run.proc.wait(10)
        written = files(out)
        late = {name: mtime / 1e9 - sent for name, (_, mtime) in written.items() if mtime / 1e9 > sent + SLACK_S}
        assert not late, f"written after {signum.name} (seconds after it): {late}"
        time.sleep(QUIET_S)
        assert files(out) == written
        if signum != signal.SIGKILL:  # stopped as Ctrl-C stops it, with the signal's exit status
            assert run.proc.returncode == 128 + signum, run.stderr
            # (Not necessarily the last line: a framework's own log may come later from a worker.)
            lines = run.stderr.splitlines()
            assert any(line.startswith("densenet train: interrupted") for line in lines), run.stderr
            assert "internal error" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    finally:
        run.stop()


def test_a_worker_killed_outright_fails_the_run_in_one_clear_line(backend_name, request, tmp_path):
    get_adapter(backend_name, request.config)
    _loopback_only(backend_name)
    run, out = _train(tmp_path, backend_name, "--workers", "2")
    try:
        run.wait_for(_training(out), "first epoch")
        procs = run.capture()
        os.kill(workers(procs)[1], signal.SIGKILL)
        left = wait_gone(procs, GONE_S)
        assert not left, f"left running {GONE_S:g} s after worker 1 was killed: {left}"
        assert run.proc.wait(10) == 1, run.stderr
        err = run.stderr
        assert "worker 1 died (killed by SIGKILL); stopping the other workers" in err, err
        # The other worker's engine saw its peer vanish: never an internal error or a traceback.
        assert "internal error" not in err and "Traceback" not in err, err
    finally:
        run.stop()


# --- single-process densenet train, densenet bench ------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("signum", SIGNALS[:2])
def test_a_signal_stops_a_single_process_run_as_ctrl_c_does(request, tmp_path, signum):
    get_adapter("torch", request.config)
    run, out = _train(tmp_path, "torch")
    try:
        run.wait_for(_training(out), "first epoch")
        run.capture()
        os.kill(run.proc.pid, signum)
        assert run.proc.wait(GONE_S) == 128 + signum, run.stderr
        last = run.stderr.strip().splitlines()[-1]
        by = signal.Signals(signum).name
        assert last.startswith(f"densenet train: interrupted by {by} in epoch") and "--resume" in last, run.stderr
        assert not alive(run.tracked)
    finally:
        run.stop()


@pytest.mark.torch
@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_to_the_bench_ends_its_case_process(request, tmp_path, signum):
    get_adapter("torch", request.config)
    argv = ("--backends", "torch", "--modes", "eager", "--phases", "train", "--arch", "1,1", "--growth-rate", "8")
    bench = Command(tmp_path, "bench", *argv, "--num-channels", "8", "--input-size", "32", "--steps", "100000")
    try:
        # The case's child has started, and has been running for a moment.
        bench.wait_for(lambda: any("--child" in cmd for _, cmd in tree(bench.proc.pid).values()), "case process", 60)
        time.sleep(1)
        procs = bench.capture()
        assert len(procs) == 2, procs
        os.kill(bench.proc.pid, signum)
        left = wait_gone(procs, GONE_S)
        assert not left, f"left running {GONE_S:g} s after {signum.name}: {left}"
        if signum != signal.SIGKILL:
            assert bench.proc.wait(10) == 128 + signum, bench.stderr
            assert bench.stderr.strip().splitlines()[-1] == f"densenet bench: interrupted ({signum.name})"
    finally:
        bench.stop()
