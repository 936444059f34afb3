"""The local launcher: N workers of one engine on this machine, supervised as one job.

It sets, for every worker, the environment the engine's own launcher would set (``torchrun``'s
variables, the JAX coordinator, ``TF_CONFIG``, MXNet's ``DMLC_*`` roles, with MXNet's scheduler
and server started beside the workers), on ports picked free on 127.0.0.1; each backend's
``launch.py`` gives that recipe (:mod:`common.distributed.engine`), read through the registry
without importing a framework. Every socket stays on the loopback interface: torch rendezvous
through a file and gloo on ``lo``; JAX's coordinator is bound to 127.0.0.1; ps-lite binds
``DMLC_NODE_HOST``. TensorFlow's gRPC server binds every interface whatever ``TF_CONFIG`` says,
so the TF workers run inside a private network namespace (``unshare -rn``) where loopback is the
only interface; where that is not possible the launcher says so on stderr and the TF ports are
open on every interface for the length of the run.

The workers are one job (:class:`common.process.lifeline.Job`): one process group, ended on every way
out. When one worker fails the others are stopped; Ctrl-C, SIGTERM and SIGHUP are passed on to
every worker as Ctrl-C (each says what it kept), what is left after GRACE_S is killed; a
``timeout_s`` bounds the whole job. Each worker dies with the launcher even when the launcher is
killed outright (``PR_SET_PDEATHSIG``), so nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common.distributed.engine import LOOPBACK, Engine
from common.distributed.group import WORKER_ENV, DistributedError
from common.errors import BackendError
from common.process import lifeline
from common.registry import launch_spec
from common.resources import child_env

# Seconds the workers get to stop by themselves (SIGINT/SIGTERM) before they are killed.
GRACE_S = 10.0


def engine_for(backend: str) -> Engine:
    """``backend``'s distributed engine (its ``launch.py``); no framework is imported."""
    try:
        found = launch_spec(backend).engine
    except BackendError:
        found = None
    if found is None:
        raise DistributedError(f"no distributed engine for backend {backend!r}")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (the OS's choice; held together while
    picking so that they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(backend: str, rank: int, world: int, ports: list[int], workdir: Path) -> dict[str, str]:
    """The environment of local worker ``rank`` of ``world``: what the engine's launcher sets."""
    return {WORKER_ENV: "1", **engine_for(backend).worker_env(rank, world, ports, workdir)}


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--workers 2`` or ``--workers=2``)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == option:
            skip = True
        elif not token.startswith(option + "="):
            out.append(token)
    return out


def namespace_available() -> bool:
    """Whether ``unshare -rn`` can give the job a private network namespace here."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    try:
        probe = subprocess.run(
            ["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def launch(
    backend: str,
    command: Sequence[str],
    workers: int,
    *,
    timeout_s: float | None = None,
    namespace: bool | None = None,
    say=None,
    interrupts: Sequence[int] = lifeline.INTERRUPTS,
) -> int:
    """Run ``command`` (an argv) as ``workers`` workers of ``backend``'s engine on this machine and
    wait for all of them; returns 0 when every worker succeeded, else the first failure's status
    (124 after ``timeout_s``, 130 when interrupted: Ctrl-C, or another of ``interrupts``).

    ``namespace`` (engines that bind every interface, TensorFlow's; default: when available)
    runs the workers in a private network namespace. ``say`` receives the launcher's notes
    (default: stderr). Call it from the main thread: only there can the signals be caught, and
    the workers die with the thread that started them.
    """
    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    if workers < 1:
        raise DistributedError(f"the number of workers must be at least 1, got {workers}")
    recipe = engine_for(backend)
    if recipe.wildcard_bind:
        available = namespace_available()
        if namespace is None:
            namespace = available
            if not available:
                say(
                    f"note: no private network namespace (unshare -rn) here: {recipe.wildcard_bind} listen on "
                    "every interface, on their ports, for the length of the run"
                )
        elif namespace and not available:
            raise DistributedError("a private network namespace was asked for, but `unshare -rn` does not work here")
        if namespace:
            # The whole job (this launcher and its workers) moves into the namespace.
            inner = [sys.executable, "-m", "common.distributed", "--backend", backend, "--workers", str(workers)]
            if timeout_s is not None:
                inner += ["--timeout", str(timeout_s)]
            wrapped = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner, "--", *command]
            env = child_env(os.environ)
            return _supervise([wrapped], [env], [], timeout_s, say, interrupts, names=["namespace"])
    ports = free_ports(recipe.ports_for(workers))
    with tempfile.TemporaryDirectory(prefix="densenet-dist-") as workdir:
        envs = [child_env(os.environ | worker_env(backend, r, workers, ports, Path(workdir))) for r in range(workers)]
        helpers = [
            (h.name, list(h.argv), child_env(os.environ | {WORKER_ENV: "1"} | dict(h.env)))
            for h in recipe.helpers(workers, ports)
        ]
        commands = [list(command)] * workers
        return _supervise(commands, envs, helpers, timeout_s, say, interrupts)


def _failure(name: str, code: int) -> str:
    """The launcher's line for a worker that ended with ``code`` (minus a signal's number)."""
    if code < 0:
        try:
            how = signal.Signals(-code).name
        except ValueError:
            how = f"signal {-code}"
        return f"{name} died (killed by {how}); stopping the other workers"
    return f"{name} exited with status {code}; stopping the other workers"


def _supervise(commands, envs, helpers, timeout_s, say, interrupts, names=None) -> int:
    names = names or [f"worker {r}" for r in range(len(commands))]
    job = lifeline.Job(GRACE_S)
    procs: list[subprocess.Popen] = []
    started: list[tuple[str, subprocess.Popen]] = []  # the engine's helpers
    finished = interrupted = False
    deadline = time.monotonic() + timeout_s if timeout_s else None
    with lifeline.interrupts(interrupts):
        try:
            for name, argv, env in helpers:
                started.append((name, job.start(argv, env)))
            for argv, env in zip(commands, envs):
                procs.append(job.start(argv, env))
            while True:
                codes = [job.status(p) for p in procs]
                failed = [(n, c) for n, c in zip(names, codes) if c not in (None, 0)]
                if failed:
                    name, code = failed[0]
                    if len(procs) > 1:
                        say(_failure(name, code))
                    return code
                if all(c == 0 for c in codes):
                    finished = True
                    return 0
                helper_codes = [(n, job.status(h)) for n, h in started]
                dead = next(((n, c) for n, c in helper_codes if c not in (None, 0)), None)
                if dead is not None:
                    say(f"{dead[0]} exited with status {dead[1]}; stopping the workers")
                    return 1
                if deadline is not None and time.monotonic() > deadline:
                    say(f"the workers did not finish within {timeout_s:g} s; stopping them")
                    return 124
                time.sleep(0.05)
        except KeyboardInterrupt:
            # Ctrl-C, SIGTERM or SIGHUP reached only this launcher (the workers are a process group
            # of their own): pass it on as Ctrl-C, so that each worker says what it kept; what is
            # left after GRACE_S (a worker inside a collective whose peer is gone) is killed.
            interrupted = True
            with lifeline.held():
                job.send(procs, signal.SIGINT)
                job.wait(procs, GRACE_S)
            return 130
        finally:
            if finished:
                # After the workers, ps-lite's scheduler and server end by themselves; else they are stopped.
                with lifeline.held():
                    job.wait([h for _, h in started], GRACE_S)
            job.end(signal.SIGKILL if interrupted else signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.distributed --backend B --workers N [--timeout S] -- COMMAND...``: the launcher
    inside TensorFlow's private network namespace (no second namespace)."""
    p = argparse.ArgumentParser(prog="python -m common.distributed", description=main.__doc__)
    p.add_argument("--backend", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--timeout", type=float)
    p.add_argument("command", nargs=argparse.REMAINDER)
    # The outer launcher supervises this one: it dies with it, asks it to stop with SIGINT (passed
    # on to the workers) and ends it with SIGTERM, at once (the workers then die with it).
    supervised = lifeline.guard_parent()
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    interrupts = (signal.SIGINT,) if supervised else lifeline.INTERRUPTS
    code = launch(args.backend, command, args.workers, timeout_s=args.timeout, namespace=False, interrupts=interrupts)
    return lifeline.exit_status(-code) if code < 0 else code  # a worker's signal, as a shell reports it
