"""Child processes that end with their job, and SIGTERM and SIGHUP taken as Ctrl-C.

A local distributed job (``densenet train --workers N``) and ``densenet bench`` start child
processes that train and write files. None of them may outlive the command that started it,
however that command ends. Three pieces, standard library only:

- :func:`interrupts`: while active, SIGTERM (``timeout``, ``kill``, a batch system) and SIGHUP
  (the terminal closing) raise :class:`Interrupt`, a ``KeyboardInterrupt``, in the main thread,
  as Ctrl-C's SIGINT does. Every ``except KeyboardInterrupt`` then treats them alike (training
  says what it kept and how to resume), and the command exits ``128 + signal`` (130 Ctrl-C, 143
  SIGTERM, 129 SIGHUP), as a shell reports a process the signal ended. A signal ignored when the
  command starts (``nohup``'s SIGHUP, SIGINT in a background job) stays ignored.
- :class:`Job`: the processes one launcher starts, in a process group of their own, so that the
  terminal's Ctrl-C reaches the launcher alone (it asks the workers to stop, then makes sure
  they did) and one ``killpg`` reaches every process of the job, grandchildren included. The
  launcher ends the group on every way out: success, failure, exception, timeout, signal.
- The parent-death guard, for when the launcher cannot act (SIGKILL, the OOM killer): every
  child of a :class:`Job` asks the kernel to SIGKILL it when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, Linux), between ``fork`` and ``exec`` so that no moment is left
  unguarded, then checks that its parent is still the launcher (had the launcher died first,
  no signal would ever come). A Python child calls :func:`guard_parent` at its start, which does
  the same again and, where ``prctl`` is not available, watches ``os.getppid()`` from a thread.

The kernel sends PR_SET_PDEATHSIG's signal when the *thread* that forked the child ends, so a
:class:`Job` must start its children from a thread that lives as long as the job (the launcher's
main thread does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "INTERRUPTS",
    "PARENT_ENV",
    "Interrupt",
    "Job",
    "run",
    "check",
    "describe",
    "exit_status",
    "guard_parent",
    "held",
    "interrupted",
    "interrupts",
]

# Set by Job.start in each child's environment: the launcher's pid, which guard_parent checks.
PARENT_ENV = "DENSENET_PARENT_PID"
# The signals that stop a command as Ctrl-C does (those this platform has: no SIGHUP on Windows).
INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# How a child dies with its launcher: at once, since nobody is left to read what it would say
# and a worker blocked in a collective would not run a Python handler anyway.
DEATH_SIGNAL = getattr(signal, "SIGKILL", signal.SIGTERM)
# How often the fallback watchdog (no prctl) looks at the parent's pid, in seconds.
WATCH_S = 0.2
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, or None where there is none (not Linux). Resolved once, here, so that a
    forked child calls it without loading anything."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


# --- SIGTERM and SIGHUP as Ctrl-C --------------------------------------------------------------


class Interrupt(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread where Ctrl-C raises KeyboardInterrupt;
    ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(describe(signum))
        self.signum = signum


def describe(signum: int) -> str:
    """``Ctrl-C`` for SIGINT, else the signal's name (``SIGTERM``)."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def exit_status(signum: int) -> int:
    """The exit status of a command the signal stopped: 128 + its number, as a shell reports it."""
    return 128 + signum


class _State:
    """What the handler has seen; one per process (signal handlers are process-wide)."""

    depth = 0  # nested interrupts() blocks
    first: int | None = None  # the first interrupting signal since the outermost block began
    holding = 0  # nested held() blocks
    pending: int | None = None  # the first signal that arrived while held
    unraisable: Any = None  # sys.unraisablehook before the outermost block
    swallowed: int | None = None  # a signal whose Interrupt a finalizer swallowed, for check()


_state = _State()


def _handler(signum: int, frame: Any) -> None:
    if _state.first is None:
        _state.first = signum
    if _state.holding:
        if _state.pending is None:
            _state.pending = signum
        return
    raise Interrupt(signum)


def _unraisable(args: Any) -> None:
    """A signal that lands while Python runs a finalizer (an MXNet array's ``__del__``) raises its
    :class:`Interrupt` there, where Python swallows it and prints a traceback: it is no bug, only
    a signal at that moment. Keep it, quietly, for :func:`check` to raise."""
    if isinstance(args.exc_value, Interrupt):
        if _state.swallowed is None:
            _state.swallowed = args.exc_value.signum
        return
    (_state.unraisable or sys.__unraisablehook__)(args)


def check() -> None:
    """Raise the :class:`Interrupt` a finalizer swallowed, if one did (a loop asks between steps)."""
    signum, _state.swallowed = _state.swallowed, None
    if signum is not None:
        raise Interrupt(signum)


def _ours_to_take(signum: int) -> bool:
    """Whether the signal's present handler is one to replace: the default action, or Python's
    own Ctrl-C handler. An ignored signal (``nohup``) or a caller's own handler is left alone."""
    current = signal.getsignal(signum)
    return current in (signal.SIG_DFL, signal.default_int_handler)


@contextmanager
def interrupts(signals: Sequence[int] = INTERRUPTS) -> Iterator[None]:
    """While active, each of ``signals`` raises :class:`Interrupt` in the main thread (the
    previous handlers come back after). :func:`interrupted` says which came first. Outside the
    main thread, where Python cannot install handlers, only Ctrl-C's own KeyboardInterrupt stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state.depth == 0:
        _state.first = None
        _state.unraisable, sys.unraisablehook = sys.unraisablehook, _unraisable
    previous = {s: signal.getsignal(s) for s in signals if _ours_to_take(s)}
    for s in previous:
        signal.signal(s, _handler)
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)
        if _state.depth == 0:
            sys.unraisablehook, _state.unraisable = _state.unraisable, None


def interrupted() -> int | None:
    """The first signal that interrupted the present (outermost) :func:`interrupts` block, or None
    (also outside any block: what an earlier one saw is over)."""
    return _state.first if _state.depth else None


class _Held:
    signum: int | None = None


@contextmanager
def held() -> Iterator[_Held]:
    """Inside, an interrupting signal is recorded instead of raised (starting a child, stopping
    a job: steps that must not be cut in half); the block's result says which came, if any, for
    the caller to raise (``Interrupt(signum)``) or not."""
    result = _Held()
    _state.holding += 1
    try:
        yield result
    finally:
        _state.holding -= 1
        if not _state.holding:
            result.signum, _state.pending = _state.pending, None


# --- the parent-death guard ----------------------------------------------------------------------


def _die_with_parent(signum: int) -> bool:
    """Ask the kernel to send ``signum`` when the parent dies; False where that is not possible."""
    return _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def _watch(parent: int, signum: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    os.kill(os.getpid(), signum)


def guard_parent(signum: int = DEATH_SIGNAL) -> bool:
    """In a process a :class:`Job` started: die (``signum``) with the launcher. Returns whether
    this process is such a child, that is, whether ``$DENSENET_PARENT_PID`` names its parent.

    The variable is taken out of the environment, so this process's own children do not inherit
    it. A process that inherited it from further up (a launcher's child ran a shell that ran
    this) is not the launcher's to guard while the launcher lives; once the launcher is gone it
    ends too, as the launcher's child did."""
    value = os.environ.pop(PARENT_ENV, None)
    try:
        parent = int(value) if value else None
    except ValueError:
        parent = None
    if parent is None:
        return False
    if os.getppid() != parent:
        if _alive(parent):
            return False  # a grandchild of a live launcher: its parent is guarded, not it
        os.kill(os.getpid(), signum)  # the launcher died before this process could ask
    if not _die_with_parent(signum):
        threading.Thread(target=_watch, args=(parent, signum), name="parent-watch", daemon=True).start()
    # Had the launcher died between the check above and prctl, no signal would come.
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_child(pgid: int, parent: int) -> Callable[[], None]:
    """What a Job's child does between fork and exec: join the job's process group (``pgid`` 0:
    lead a new one), ask to die with the launcher, check the launcher is still its parent."""
    die_with_parent = _die_with_parent

    def setup() -> None:
        os.setpgid(0, pgid)
        # In its own process group the child is a background job of the terminal: with `stty
        # tostop` its first line on the terminal would stop it (SIGTTOU). Blocked, it writes
        # (POSIX), and the mask outlives exec. (Not signal.signal: Python allows that in the
        # main thread only, and a caller may start a job from another.)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTTOU])
        if die_with_parent(DEATH_SIGNAL) and os.getppid() != parent:
            os._exit(exit_status(DEATH_SIGNAL))

    return setup


# --- a job: one process group, ended on every way out --------------------------------------------


class Job:
    """The processes of one job, in one process group that the launcher ends as a whole.

    Exit statuses are read without reaping (``waitid(WNOWAIT)``), so that every child's pid, and
    with the first one's the group's id, stays taken until :meth:`end`: a ``killpg`` of the group
    can never reach a process that has since reused the number.
    """

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.procs: list[subprocess.Popen] = []
        self.pgid: int | None = None

    def start(self, argv: Sequence[str], env: Mapping[str, str], **popen: Any) -> subprocess.Popen:
        """Start ``argv`` in the job (``popen``: more ``subprocess.Popen`` arguments). A signal
        that arrives meanwhile is raised once the child is on the list, so it is always ended."""
        parent = os.getpid()
        with held() as h:
            proc = subprocess.Popen(
                list(argv),
                env={**env, PARENT_ENV: str(parent)},
                preexec_fn=_in_child(self.pgid or 0, parent),
                **popen,
            )
            self.procs.append(proc)
            if self.pgid is None:
                self.pgid = proc.pid
        if h.signum is not None:
            raise Interrupt(h.signum)
        return proc

    def status(self, proc: subprocess.Popen) -> int | None:
        """``proc``'s exit status (minus the signal that ended it), None while it runs."""
        if proc.returncode is not None:
            return proc.returncode
        if not hasattr(os, "waitid"):
            return proc.poll()
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def running(self, procs: Sequence[subprocess.Popen] | None = None) -> list[subprocess.Popen]:
        return [p for p in (self.procs if procs is None else procs) if self.status(p) is None]

    def send(self, procs: Sequence[subprocess.Popen], signum: int) -> None:
        """Send ``signum`` to each of ``procs`` still running (not to the rest of the group)."""
        for p in self.running(procs):
            try:
                os.kill(p.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, procs: Sequence[subprocess.Popen] | None, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``procs`` (default: all) to end; whether they all did."""
        deadline = time.monotonic() + seconds
        while self.running(procs):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def end(self, first: int = signal.SIGTERM) -> None:
        """End whatever is left of the job: ``first`` to the whole group, SIGKILL to what is left
        after ``grace_s`` (grandchildren included), then reap every child. Signals that arrive
        meanwhile are held: the job is ending already."""
        with held():
            if self.running():
                self._killpg(first)
                self.wait(None, self.grace_s)
            self._killpg(signal.SIGKILL)
            for p in self.procs:
                p.wait()

    def _killpg(self, signum: int) -> None:
        # Only while a child is unreaped: then the group's id cannot belong to anybody else.
        if self.pgid is None or all(p.returncode is not None for p in self.procs):
            return
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            pass


def run(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` to its end in a :class:`Job` of its own, its output captured as text: the child
    dies with this process, and it is killed (with anything it started) on timeout, Ctrl-C,
    SIGTERM or SIGHUP. Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    job = Job(grace_s=0)
    try:
        proc = job.start(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=timeout)
    finally:
        job.end(signal.SIGKILL)  # a measurement or a check: nothing to save, so at once
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
