"""The local launcher: N workers of one engine on this machine, supervised as one job.

It sets, for every worker, the environment the engine's own launcher would set (``torchrun``'s
variables, the JAX coordinator, ``TF_CONFIG``, MXNet's ``DMLC_*`` roles, with MXNet's scheduler
and server started beside the workers), on ports picked free on 127.0.0.1. Every socket stays on
the loopback interface: torch rendezvous through a file and gloo on ``lo``; JAX's coordinator is
bound to 127.0.0.1; ps-lite binds ``DMLC_NODE_HOST``. TensorFlow's gRPC server binds every
interface whatever ``TF_CONFIG`` says, so the TF workers run inside a private network namespace
(``unshare -rn``) where loopback is the only interface; where that is not possible the launcher
says so on stderr and the TF ports are open on every interface for the length of the run.

When one worker fails the others are stopped; Ctrl-C stops them all; a ``timeout_s`` bounds the
whole job. Children get their own process group, so nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.distributed.group import WORKER_ENV, DistributedError
from common.resources import child_env

LOOPBACK = "127.0.0.1"
# Seconds the workers get to stop by themselves (SIGINT/SIGTERM) before they are killed.
GRACE_S = 10.0


@dataclass(frozen=True)
class Engine:
    """How one backend's engine is launched (documentation and the launcher's recipe)."""

    name: str
    ports: int  # loopback ports one local job needs
    wildcard_bind: bool  # whether its servers bind every interface whatever they are told
    across_machines: str  # the engine's own way, in one line (docs/distributed.md has the commands)
    sync_bn_refusal: str | None = None  # why --sync-bn is refused, where it is


TORCH_SYNC_BN = (
    "torch.nn.SyncBatchNorm runs on GPUs only (PyTorch raises 'SyncBatchNorm expected input tensor to be on "
    "GPU' for CPU tensors) and this suite's PyTorch backend runs on the CPU; train without --sync-bn "
    "(per-worker BatchNorm statistics, what DistributedDataParallel does)"
)
MXNET_SYNC_BN = (
    "MXNet's SyncBatchNorm (gluon.contrib.nn) synchronises the devices of one process through a shared "
    "in-process buffer, never across dist_sync kvstore processes; train without --sync-bn "
    "(per-worker BatchNorm statistics)"
)


ENGINES: dict[str, Engine] = {
    "torch": Engine(
        "torch.distributed + DistributedDataParallel (gloo)",
        0,
        False,
        "torchrun --nnodes/--rdzv-endpoint",
        TORCH_SYNC_BN,
    ),
    "jax": Engine("jax.distributed + jit over a device Mesh", 1, False, "coordinator address, process id and count"),
    "tf": Engine("tf.distribute.MultiWorkerMirroredStrategy", -1, True, "TF_CONFIG per worker"),
    "mxnet": Engine("MXNet kvstore dist_sync (ps-lite)", 1, False, "tools/launch.py with a host file", MXNET_SYNC_BN),
}


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
    env = {WORKER_ENV: "1"}
    if backend == "torch":
        # A FileStore instead of torchrun's TCPStore (whose server binds every interface).
        env |= {
            "DENSENET_TORCH_INIT": f"file://{workdir / 'torch-store'}",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "GLOO_SOCKET_IFNAME": "lo",
        }
    elif backend == "jax":
        env |= {
            "DENSENET_JAX_COORDINATOR": f"{LOOPBACK}:{ports[0]}",
            "DENSENET_JAX_BIND": f"{LOOPBACK}:{ports[0]}",
            "DENSENET_JAX_PROCESS_ID": str(rank),
            "DENSENET_JAX_NUM_PROCESSES": str(world),
        }
    elif backend == "tf":
        cluster = {"worker": [f"{LOOPBACK}:{p}" for p in ports[:world]]}
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}})
    elif backend == "mxnet":
        env |= _mxnet_env("worker", world, ports)
    else:
        raise DistributedError(f"no distributed engine for backend {backend!r}")
    return env


def _mxnet_env(role: str, world: int, ports: list[int]) -> dict[str, str]:
    return {
        "DMLC_ROLE": role,
        "DMLC_PS_ROOT_URI": LOOPBACK,
        "DMLC_PS_ROOT_PORT": str(ports[0]),
        "DMLC_NUM_SERVER": "1",
        "DMLC_NUM_WORKER": str(world),
        "DMLC_NODE_HOST": LOOPBACK,  # every ps-lite socket binds this address
    }


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


def _stop(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _stop_all(procs: Sequence[subprocess.Popen], first: int = signal.SIGTERM) -> None:
    """Ask every process group to stop, then kill what is left after GRACE_S."""
    _stop(procs, first)
    deadline = time.monotonic() + GRACE_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    _stop(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def launch(
    backend: str,
    command: Sequence[str],
    workers: int,
    *,
    timeout_s: float | None = None,
    namespace: bool | None = None,
    say=None,
) -> int:
    """Run ``command`` (an argv) as ``workers`` workers of ``backend``'s engine on this machine and
    wait for all of them; returns 0 when every worker succeeded, else the first failure's status
    (124 after ``timeout_s``, 130 on Ctrl-C).

    ``namespace`` (TensorFlow only; default: when available) runs the workers in a private network
    namespace. ``say`` receives the launcher's notes (default: stderr).
    """
    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    if workers < 1:
        raise DistributedError(f"the number of workers must be at least 1, got {workers}")
    if backend == "tf":
        available = namespace_available()
        if namespace is None:
            namespace = available
            if not available:
                say(
                    "note: no private network namespace (unshare -rn) here: TensorFlow's workers listen on "
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
            return _supervise([wrapped], [env], [], [], timeout_s, say, names=["namespace"])
    ports = free_ports(workers if backend == "tf" else ENGINES[backend].ports)
    with tempfile.TemporaryDirectory(prefix="densenet-dist-") as workdir:
        envs = [child_env(os.environ | worker_env(backend, r, workers, ports, Path(workdir))) for r in range(workers)]
        roles, role_envs = [], []
        if backend == "mxnet":  # ps-lite's scheduler and one server: `import mxnet` with a role
            for role in ("scheduler", "server"):
                roles.append([sys.executable, "-m", "densenet_mxnet.distributed"])
                role_envs.append(child_env(os.environ | {WORKER_ENV: "1"} | _mxnet_env(role, workers, ports)))
        commands = [list(command)] * workers
        return _supervise(commands, envs, roles, role_envs, timeout_s, say)


def _supervise(commands, envs, roles, role_envs, timeout_s, say, names=None) -> int:
    names = names or [f"worker {r}" for r in range(len(commands))]
    procs: list[subprocess.Popen] = []
    helpers: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        for argv, env in zip(roles, role_envs):
            helpers.append(subprocess.Popen(argv, env=env, start_new_session=True))
        for argv, env in zip(commands, envs):
            procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(n, c) for n, c in zip(names, codes) if c not in (None, 0)]
            if failed:
                name, code = failed[0]
                if len(procs) > 1:
                    say(f"{name} exited with status {code}; stopping the other workers")
                return code
            if all(c == 0 for c in codes):
                return 0
            dead_helper = next((h for h in helpers if h.poll() not in (None, 0)), None)
            if dead_helper is not None:
                say(
                    f"the MXNet {'scheduler' if dead_helper is helpers[0] else 'server'} exited with status "
                    f"{dead_helper.returncode}; stopping the workers"
                )
                return 1
            if deadline is not None and time.monotonic() > deadline:
                say(f"the workers did not finish within {timeout_s:g} s; stopping them")
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        # The terminal's Ctrl-C reached only this launcher (the workers have their own process
        # groups): pass it on, so that each worker says what it kept, then make sure they end.
        _stop_all(procs, signal.SIGINT)
        return 130
    finally:
        _stop_all(procs)
        # After the workers, ps-lite's scheduler and server end by themselves; else they are stopped.
        end = time.monotonic() + GRACE_S
        while any(h.poll() is None for h in helpers) and time.monotonic() < end:
            time.sleep(0.05)
        _stop_all(helpers)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.distributed --backend B --workers N [--timeout S] -- COMMAND...``: the launcher
    inside TensorFlow's private network namespace (no second namespace)."""
    p = argparse.ArgumentParser(prog="python -m common.distributed", description=main.__doc__)
    p.add_argument("--backend", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--timeout", type=float)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(args.backend, command, args.workers, timeout_s=args.timeout, namespace=False)
