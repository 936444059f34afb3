"""common.process.lifeline: SIGTERM and SIGHUP as Ctrl-C, jobs in one process group, children that die
with their launcher (issue 24). Framework-free and quick: the children are small Python
programs; tests/test_faults.py runs the real commands.

Every process a test starts is killed in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.process import lifeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc: Linux")
ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 10.0  # what any of these waits may take at most


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], seconds: float = BOUND_S) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _wait_file(path: Path, seconds: float = BOUND_S) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {seconds:g} s")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


# --- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_raises_a_keyboard_interrupt_that_says_which(signum):
    before = {s: signal.getsignal(s) for s in lifeline.INTERRUPTS}
    with lifeline.interrupts():
        assert lifeline.interrupted() is None
        with pytest.raises(KeyboardInterrupt) as caught:
            os.kill(os.getpid(), signum)
            time.sleep(BOUND_S)  # the handler raises in the main thread before this ends
        assert isinstance(caught.value, lifeline.Interrupt) and caught.value.signum == signum
        assert lifeline.interrupted() == signum  # remembered for the exit status
    assert lifeline.exit_status(signum) == {signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGINT: 130}[signum]
    # Over with the block: the handlers are back as they were, and the signal is forgotten.
    assert {s: signal.getsignal(s) for s in lifeline.INTERRUPTS} == before
    assert lifeline.interrupted() is None


def test_an_ignored_signal_stays_ignored_and_a_held_one_is_recorded():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with lifeline.interrupts():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            with lifeline.held() as held:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # delivered, and not raised
            assert held.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGHUP, previous)


# --- jobs ----------------------------------------------------------------------------------------


def test_a_job_ends_its_children_and_their_children(tmp_path: Path):
    """One killpg reaches every process of the job, including one a child started."""
    spawner = f"""
        import subprocess, sys, time
        from pathlib import Path
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        Path(r"{tmp_path}/pids").write_text(f"{{grandchild.pid}}\\n")
        time.sleep(60)
    """
    job = lifeline.Job(grace_s=2)
    pids: list[int] = []
    try:
        child = job.start(_python(spawner), _env())
        pids = [child.pid, int(_wait_file(tmp_path / "pids"))]
        assert job.status(child) is None and os.getpgid(child.pid) == os.getpgid(pids[1]) == child.pid
        assert os.getpgid(child.pid) != os.getpgrp()  # not the terminal's (the launcher's) group
        started = time.monotonic()
        job.end()
        assert time.monotonic() - started < BOUND_S
        assert not _wait_gone(pids, 2)
        assert child.returncode == -signal.SIGTERM
    finally:
        _kill(pids)
        job.end(signal.SIGKILL)


def test_exit_statuses_are_read_without_reaping():
    job = lifeline.Job(grace_s=1)
    try:
        quick = job.start(_python("import sys; sys.exit(3)"), _env())
        killed = job.start(_python("import os; os.kill(os.getpid(), 9)"), _env())
        assert job.wait(None, BOUND_S)
        assert (job.status(quick), job.status(killed)) == (3, -signal.SIGKILL)
        # Not reaped yet: the group's id cannot be taken by another process until end().
        assert quick.returncode is None and Path(f"/proc/{quick.pid}").exists()
    finally:
        job.end()
    assert (quick.returncode, killed.returncode) == (3, -signal.SIGKILL)


# --- children die with their launcher -------------------------------------------------------------

# A launcher that starts one child in a Job, writes the child's pid, and waits to be killed; the
# child writes whether it is guarded. ARGV: PIDS_FILE GUARD_FILE [--no-prctl].
LAUNCHER = """
import os, sys, time
from pathlib import Path
from common.process import lifeline
no_prctl = "--no-prctl" in sys.argv
if no_prctl:
    lifeline._PRCTL = None  # as where prctl does not exist: the child's watchdog thread acts
child_code = (
    "import sys, time; from pathlib import Path; from common.process import lifeline; "
    + ("lifeline._PRCTL = None; " if no_prctl else "")
    + f"Path({sys.argv[2]!r}).write_text(str(lifeline.guard_parent()) + chr(10)); time.sleep(60)"
)
child = lifeline.Job().start([sys.executable, "-c", child_code], dict(os.environ))
Path(sys.argv[1]).write_text(f"{child.pid}\\n")
time.sleep(60)
"""


@pytest.mark.parametrize("prctl", [True, False], ids=["prctl", "watchdog"])
def test_a_child_dies_when_its_launcher_is_killed_outright(tmp_path: Path, prctl: bool):
    argv = [sys.executable, "-c", LAUNCHER, str(tmp_path / "pids"), str(tmp_path / "guard")]
    launcher = subprocess.Popen(argv + ([] if prctl else ["--no-prctl"]), env=_env(), start_new_session=True)
    pids = [launcher.pid]
    try:
        pids.append(int(_wait_file(tmp_path / "pids")))
        assert _wait_file(tmp_path / "guard").strip() == "True"  # it knows its launcher
        launcher.kill()  # SIGKILL: the launcher can do nothing about its child
        launcher.wait(BOUND_S)
        assert not _wait_gone(pids[1:], 5), "the child outlived its launcher"
    finally:
        _kill(pids)
        launcher.wait(BOUND_S)


def test_a_child_whose_launcher_died_before_the_guard_ends_at_once():
    """The race prctl alone cannot close: the launcher died before the child asked."""
    dead = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    dead_pid = int(dead.communicate(timeout=BOUND_S)[0])  # a launcher that is gone
    code = "from common.process import lifeline; lifeline.guard_parent(); print('still here')"
    child = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(**{lifeline.PARENT_ENV: str(dead_pid)}),
        capture_output=True,
        text=True,
        timeout=BOUND_S,
    )
    assert child.returncode == -signal.SIGKILL and "still here" not in child.stdout


def test_a_grandchild_of_a_live_launcher_is_not_guarded_and_the_variable_is_not_passed_on():
    code = (
        "import os; from common.process import lifeline; "
        f"print(lifeline.guard_parent(), os.environ.get({lifeline.PARENT_ENV!r}))"
    )
    # This test's process stands for the launcher; the shell between makes the child a grandchild.
    argv = ["sh", "-c", f'"{sys.executable}" -c "{code}"; true']
    child = subprocess.run(
        argv, env=_env(**{lifeline.PARENT_ENV: str(os.getpid())}), capture_output=True, text=True, timeout=BOUND_S
    )
    assert child.returncode == 0 and child.stdout.split() == ["False", "None"], child.stderr


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("mangled", [False, True], ids=["as-raised", "mangled-by-a-framework"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_command_stopped_by_a_signal_says_so_and_exits_128_plus_it(monkeypatch, capsys, signum, mangled):
    """``densenet compare`` stopped by SIGTERM or SIGHUP: Ctrl-C's one line, naming the signal, and
    128 + its number; also when a framework turned the KeyboardInterrupt into another exception
    (TensorFlow's pybind11 does), which is no internal error."""
    from common.cli import main

    def command(*args, **kwargs):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(BOUND_S)
        except KeyboardInterrupt:
            if mangled:
                raise RuntimeError("MISMATCH of original and normalized active exception types") from None
            raise

    monkeypatch.setattr("common.cli.inspection.compare_shapes", command)
    before = {s: signal.getsignal(s) for s in lifeline.INTERRUPTS}
    assert main(["compare"]) == 128 + signum
    assert capsys.readouterr().err.strip() == f"densenet compare: interrupted ({signum.name})"
    assert {s: signal.getsignal(s) for s in lifeline.INTERRUPTS} == before


def test_a_signal_inside_a_finalizer_is_raised_after_it(capfd: pytest.CaptureFixture[str]) -> None:
    """A signal that lands in a ``__del__`` (seen with MXNet's arrays) is not lost to Python's
    "Exception ignored" with a traceback: it is kept and raised at the next check."""

    class Finalized:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, inside the finalizer
                pass

    with pytest.raises(lifeline.Interrupt) as info:
        with lifeline.interrupts():
            Finalized()  # dropped at once: its Interrupt is swallowed, quietly
            lifeline.check()  # and raised here, where a training loop asks between steps
    assert info.value.signum == signal.SIGTERM
    lifeline.check()  # raised once only
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err
    assert sys.unraisablehook is sys.__unraisablehook__ or sys.unraisablehook.__module__ != "common.process.lifeline"


def test_run_returns_the_output_and_kills_what_outlives_its_timeout(tmp_path: Path) -> None:
    """``lifeline.run``: a child that ends gives its status and output; one that outlives the
    timeout is killed together with the grandchild it started, and the timeout is raised."""
    done = lifeline.run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], _env(), timeout=BOUND_S)
    assert (done.returncode, done.stdout.strip()) == (3, "out")
    pids = tmp_path / "pids"
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{grandchild.pid}}")
        time.sleep(60)
    """)
    with pytest.raises(subprocess.TimeoutExpired):
        lifeline.run([sys.executable, "-c", code], _env(), timeout=3)
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2 and _wait_gone(started) == []
