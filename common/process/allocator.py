"""Which ``malloc`` a PyTorch process runs on, and starting one on TCMalloc; which engine an MXNet
process runs a memory-efficient network on.

PyTorch takes every CPU tensor from ``malloc``. glibc's ``malloc`` serves each block over 32 MiB
(most activations of a training step: 64 channels at 48x48 in a batch of 128 is 75 MB) with a
fresh ``mmap`` and unmaps it on ``free``, so the kernel zero-fills every such block again on the
next step. TCMalloc keeps freed memory and hands it out again, and PyTorch trains faster on it
(docs/performance.md#what-each-backend-runs-by-default-and-why). MXNet and TensorFlow pool their
own memory, and JAX's step did not change with glibc's reuse either.

MXNet's memory-efficient network has a like problem with MXNet's own engine, solved the same way
(:func:`mxnet_engine_env`): the threaded engine runs each operation after Python has queued it,
and keeps every array a queued operation reads alive until then, so the recomputation's
transient arrays pile up. MXNet's synchronous ``NaiveEngine`` frees them as Python drops them,
and the step takes less memory and less time (docs/performance.md#memory-and-time-measured).

``malloc`` is chosen when a process starts (``LD_PRELOAD``), so ``densenet train`` (in one
process: distributed PyTorch workers on TCMalloc sometimes aborted at exit, in gloo) and
``densenet evaluate`` with ``--backend torch`` start again on TCMalloc when it is installed
(Debian: ``libtcmalloc-minimal4``) and not yet loaded, and the bench starts its PyTorch cases on
it (but the book's own, ``nchw``), as PyTorch's own performance guide advises.
``DENSENET_MALLOC=system`` keeps glibc's. Nothing here imports a framework.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.distributed.group import WORKER_ENV
from common.errors import DenseNetError
from common.registry import launch_spec

ENV = "DENSENET_MALLOC"
"""``tcmalloc`` (the default for PyTorch) or ``system``."""

CHOICES = ("tcmalloc", "system")
MXNET_ENGINE = "MXNET_ENGINE_TYPE"
"""MXNet reads its engine from this variable once, when it is imported."""
SYNCHRONOUS_ENGINE = "NaiveEngine"
_RELAUNCHED = "DENSENET_MALLOC_RELAUNCHED"
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


class MallocError(DenseNetError, ValueError):
    """``$DENSENET_MALLOC`` names no known allocator."""


def choice(env: Mapping[str, str] | None = None) -> str:
    """What ``$DENSENET_MALLOC`` asks for; an unknown value is refused with the choices."""
    value = (os.environ if env is None else env).get(ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if value not in CHOICES:
        raise MallocError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def find_tcmalloc() -> str | None:
    """The path of an installed TCMalloc library, or None."""
    if not sys.platform.startswith("linux"):
        return None
    for directory in _DIRS:
        for name in _NAMES:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def in_use() -> str:
    """``tcmalloc`` when this process has TCMalloc mapped, else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "tcmalloc" if "libtcmalloc" in maps else "system"


def _without_tcmalloc(preload: str) -> str:
    return " ".join(p for p in preload.replace(":", " ").split() if "libtcmalloc" not in p)


def child_env(base: Mapping[str, str], wanted: str) -> dict[str, str]:
    """``base`` for a child process that is to run on ``wanted`` (``tcmalloc`` or ``system``).
    ``tcmalloc`` falls back to the system's when it is not installed (the child reports which)."""
    env = dict(base)
    rest = _without_tcmalloc(env.get("LD_PRELOAD", ""))
    path = find_tcmalloc() if wanted == "tcmalloc" else None
    preload = " ".join(p for p in (path, rest) if p)
    if preload:
        env["LD_PRELOAD"] = preload
    else:
        env.pop("LD_PRELOAD", None)
    if path:
        # TCMalloc reports every allocation over 1 GiB on stderr; a large batch makes many.
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def relaunch_on_tcmalloc(argv: Sequence[str]) -> None:
    """Replace this process by the same command on TCMalloc, when it is wanted, installed and not
    already loaded; otherwise return. Call it before any framework is imported. ``argv`` is the
    interpreter's own command line after the interpreter (``sys.orig_argv[1:]``)."""
    if choice() != "tcmalloc" or in_use() == "tcmalloc" or os.environ.get(_RELAUNCHED):
        return
    if os.environ.get(WORKER_ENV):
        # A distributed worker runs on the malloc its launcher gave it (the CLI keeps distributed
        # runs on glibc's); restarting one alone would split a group across allocators.
        return
    if find_tcmalloc() is None:
        return
    env = child_env(os.environ, "tcmalloc")
    env[_RELAUNCHED] = "1"  # never twice, even if the preload did not take
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def mxnet_engine(env: Mapping[str, str] | None = None) -> str:
    """The engine MXNet runs on in a process started with ``env`` (default: this one's)."""
    return (os.environ if env is None else env).get(MXNET_ENGINE) or "ThreadedEnginePerDevice"


def wanted(backend: str) -> str:
    """The ``malloc`` a ``backend`` process runs on: the backend's own preference (its
    ``launch.py``: TCMalloc for PyTorch) as ``$DENSENET_MALLOC`` allows, else the system's."""
    return choice() if launch_spec(backend).malloc == "tcmalloc" else "system"


def engine_record(backend: str) -> dict[str, str]:
    """What a result of ``backend`` run in this process records of its engine: MXNet's, or nothing
    (the backend's ``launch.py`` says)."""
    return launch_spec(backend).runtime_record()


def mxnet_engine_env(base: Mapping[str, str], backend: str, memory_efficient: bool) -> dict[str, str]:
    """``base`` for a process that trains a ``backend`` network eagerly: a memory-efficient MXNet
    one runs on the synchronous ``NaiveEngine`` (module docstring), unless ``base`` already names
    an engine; anything else runs on ``base`` as it is (the backend's ``launch.py`` says)."""
    return launch_spec(backend).eager_env(base, memory_efficient)
