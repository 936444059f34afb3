"""How many threads every framework computes with: ``--threads N``, set before any framework loads.

A framework sizes its thread pools once, when it is imported, from environment variables (and
PyTorch from a call), so the count has to be in place before the first import. :func:`apply`
writes one table of variables, the same for all four frameworks (a variable one framework does
not read is ignored by the others), and ``DENSENET_THREADS``, which the backends' own hooks read
for what has no variable (PyTorch's inter-op pool; TensorFlow's count as its API reports it) and
which child processes (bench cases, distributed workers, measurement children) inherit, so they
compute with the same count as the command that started them.

Without ``--threads`` a command takes ``DENSENET_THREADS`` (a parent's count), else an exported
``OMP_NUM_THREADS``, else the cores this process may run on (``os.sched_getaffinity``), and
records the count either way
(``run.json``, the bench report). What each framework honours was measured by counting the
threads that did compute work (docs/performance.md#threads-and-a-busy-machine). Nothing here
imports a framework.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping

from common.errors import InputError

__all__ = [
    "ENV",
    "MAX_THREADS",
    "POOLS",
    "apply",
    "current",
    "default_threads",
    "environment",
    "requested",
    "resolve",
    "thread_count",
]

ENV = "DENSENET_THREADS"
# More threads than this only exhausts the system's limits; no machine this runs on has the cores.
MAX_THREADS = 1024

# Variable -> the pool it sizes; each is set to N. Measured with jaxlib 0.7.1: JAX's XLA:CPU pool
# follows PJRT_NPROC; XLA_FLAGS' --xla_cpu_multi_thread_eigen=false still left two or three
# threads computing, and `intra_op_parallelism_threads=N` there is not an XLA flag (a token
# without `--` that XLA skips), so XLA_FLAGS is left as the user set it.
POOLS: dict[str, str] = {
    "OMP_NUM_THREADS": "OpenMP: PyTorch's intra-op pool, MXNet's operators, oneDNN",
    "MKL_NUM_THREADS": "MKL's BLAS",
    "OPENBLAS_NUM_THREADS": "OpenBLAS (numpy: the input pipeline, the numpy oracle)",
    "TF_NUM_INTRAOP_THREADS": "TensorFlow's intra-op pool (Eigen and oneDNN kernels)",
    "TF_NUM_INTEROP_THREADS": "TensorFlow's inter-op pool (runs independent operations)",
    "PJRT_NPROC": "JAX: XLA:CPU's intra-op pool",
}
# Fixed whatever N is: MXNet's engine runs operators on this many worker threads, each using
# OMP_NUM_THREADS of its own, so N workers would compute on N x N threads (measured: 4 at N=2).
# One is MXNet's default.
FIXED: dict[str, str] = {"MXNET_CPU_WORKER_NTHREADS": "1"}


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parse(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or not 1 <= int(text) <= MAX_THREADS:
        raise ValueError(f"expected a thread count from 1 to {MAX_THREADS}, got {text!r}")
    return int(text)


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: 1 to :data:`MAX_THREADS`."""
    try:
        return _parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def requested(env: Mapping[str, str] | None = None) -> int | None:
    """The count a densenet command set up in this process (``DENSENET_THREADS``), or None.

    For the backends' hooks at import; a value that is not a count raises :class:`InputError`.
    """
    value = (os.environ if env is None else env).get(ENV)
    if value is None or not value.strip():
        return None
    try:
        return _parse(value)
    except ValueError as exc:
        raise InputError(f"{ENV}={value!r}: {exc} (unset it or pass --threads)") from None


def _openmp_count(env: Mapping[str, str]) -> int | None:
    """The outermost level of ``OMP_NUM_THREADS`` (``4`` or ``4,2``), if it is a count."""
    first = env.get("OMP_NUM_THREADS", "").split(",")[0]
    try:
        return _parse(first)
    except ValueError:
        return None  # not a count: replaced like any other value


def resolve(given: int | None) -> int:
    """``--threads`` if given, else ``DENSENET_THREADS`` (a parent's count), else the
    ``OMP_NUM_THREADS`` a person or a launcher (torchrun sets 1) exported, which then holds for
    every framework, not only those on OpenMP, else :func:`default_threads`."""
    if given is not None:
        return given
    for found in (requested(), _openmp_count(os.environ)):
        if found is not None:
            return found
    return default_threads()


def current() -> int:
    """The count this process computes with, for the records (``run.json``, the bench report):
    what ``densenet`` set up, or would set up in a process that called it without ``--threads``."""
    return resolve(None)


def environment(n: int) -> dict[str, str]:
    """Every variable that sizes a framework's pools for ``n`` threads, ``DENSENET_THREADS`` included."""
    if not 1 <= n <= MAX_THREADS:
        raise InputError(f"expected a thread count from 1 to {MAX_THREADS}, got {n}")
    return {ENV: str(n), **dict.fromkeys(POOLS, str(n)), **FIXED}


def apply(given: int | None) -> int:
    """Set this process (and its children) up for :func:`resolve`'s count; returns it.

    Call it before any framework is imported: one already loaded keeps the pools it made."""
    n = resolve(given)
    os.environ.update(environment(n))
    return n
