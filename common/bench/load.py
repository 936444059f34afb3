"""The load a benchmark ran under: what else the machine was doing while a case was timed.

A step time measured beside another busy process is slower and noisier than the same step alone
(docs/performance.md#threads-and-a-busy-machine), and nothing in the number says so. So each case
records, from the bench's side of the process boundary:

- the 1-minute load average before and after it (``os.getloadavg``). It is a decaying average
  that counts the bench's own case too, so it is context, not a measurement of the others;
- the share of the machine's CPU time (all cores) that the hypervisor took (*steal*), and the
  share that other processes used, while the case's process ran. Both come from the aggregate
  ``cpu`` line of ``/proc/stat`` read before and after the case; the others' time is the machine's
  busy time minus the CPU time of the bench and of its case (``getrusage``), which leaves what
  neither of them ran.

Linux only: where ``/proc/stat`` (or the load average) cannot be read, the fields are ``None``.
The arithmetic is in pure functions (:func:`parse_proc_stat`, :func:`shares`,
:func:`bfloat16_support`) that take text and numbers, so tests can feed them a made-up machine.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUSY_LOAD_PER_CORE",
    "BUSY_OTHERS",
    "BUSY_STEAL",
    "CpuTimes",
    "Window",
    "bfloat16_support",
    "busy_reasons",
    "cpu_bfloat16",
    "parse_proc_stat",
    "read_cpu_times",
    "sample",
    "shares",
]

# When the bench warns. A 1-minute load average above half a runnable task per core means another
# process wanted a core for much of the last minute; other processes using a tenth of the machine's
# CPU time, or the hypervisor taking a twentieth, is enough to move a step time well beyond the
# spread of an idle run (one busy core of two made PyTorch's step 3.4x slower, docs/performance.md).
BUSY_LOAD_PER_CORE = 0.5
BUSY_OTHERS = 0.10
BUSY_STEAL = 0.05


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate ``cpu`` line of ``/proc/stat``, in clock ticks summed over every core."""

    busy: int
    """user + nice + system + irq + softirq: CPU time some process or the kernel ran. (guest and
    guest_nice are not added: the kernel counts them inside user and nice already.)"""
    idle: int
    """idle + iowait: nothing ran (iowait is idle time with a disk read outstanding)."""
    steal: int
    """Time this virtual machine's cores were ready but the hypervisor ran someone else."""

    @property
    def total(self) -> int:
        return self.busy + self.idle + self.steal


def parse_proc_stat(text: str) -> CpuTimes | None:
    """The ``cpu`` line of ``/proc/stat``'s text, or None if there is none that can be read. Kernels
    before 2.6.11 have no steal column; it counts as 0 there."""
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] != "cpu":
            continue
        try:
            ticks = [int(v) for v in fields[1:9]]
        except ValueError:
            return None
        if len(ticks) < 5:  # user nice system idle iowait: every kernel since 2.6 has them
            return None
        ticks += [0] * (8 - len(ticks))
        user, nice, system, idle, iowait, irq, softirq, steal = ticks
        return CpuTimes(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)
    return None


def read_cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    try:
        with open(path) as f:
            return parse_proc_stat(f.read())
    except OSError:
        return None


def _clock_ticks() -> int | None:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return None


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _own_cpu_s() -> float:
    """CPU time of this process and of every child it has reaped, user and system, in seconds."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def shares(
    before: CpuTimes | None, after: CpuTimes | None, own_cpu_s: float, ticks_per_s: int | None
) -> tuple[float | None, float | None]:
    """``(steal, others)``: the shares of the machine's CPU time between two readings that the
    hypervisor took and that processes other than ours (``own_cpu_s`` of CPU time) used; ``None``
    where a reading is missing or no time passed."""
    if before is None or after is None or not ticks_per_s:
        return None, None
    elapsed = after.total - before.total
    if elapsed <= 0:
        return None, None
    steal = (after.steal - before.steal) / elapsed
    # /proc/stat charges whole ticks to whatever was running when the timer fired, getrusage adds
    # up exact run times, so over a short window ours can exceed the ticks by a fraction of one:
    # a negative share would be that rounding, not a measurement.
    others = max(0.0, (after.busy - before.busy - own_cpu_s * ticks_per_s) / elapsed)
    return steal, others


def busy_reasons(
    load_average: float | None, cpus: int | None, steal: float | None, others: float | None, *, load_too: bool = True
) -> list[str]:
    """What made a stretch of time busy, in words (empty: nothing above the thresholds)."""
    reasons = []
    if load_too and load_average is not None and cpus and load_average / cpus > BUSY_LOAD_PER_CORE:
        reasons.append(f"1-minute load average {load_average:.2f} on {cpus} core{'s' * (cpus != 1)}")
    if others is not None and others > BUSY_OTHERS:
        reasons.append(f"other processes used {others:.0%} of the CPU time")
    if steal is not None and steal > BUSY_STEAL:
        reasons.append(f"the hypervisor took {steal:.0%} of the CPU time (steal)")
    return reasons


class Window:
    """The load over a stretch of time: :meth:`close` gives the record of what ran meanwhile."""

    def __init__(self) -> None:
        self.load_before = _load_average()
        self.cpu_before = _own_cpu_s()
        self.started = time.perf_counter()
        self.times_before = read_cpu_times()  # last, nearest to the work

    def close(self) -> dict[str, Any]:
        """The record (the JSON's ``load``): load averages, steal and others' shares, the CPU time
        the bench and its case used, the window's length. Call it after the case's process is
        reaped, so that its CPU time is in ``RUSAGE_CHILDREN``."""
        times_after = read_cpu_times()
        window = time.perf_counter() - self.started
        own = _own_cpu_s() - self.cpu_before
        steal, others = shares(self.times_before, times_after, own, _clock_ticks())
        return {
            "load_avg_1min_before": self.load_before,
            "load_avg_1min_after": _load_average(),
            "steal_share": steal,
            "others_share": others,
            "own_cpu_s": own,
            "window_s": window,
        }


def sample(seconds: float = 0.5) -> dict[str, Any]:
    """The load right now: a :class:`Window` over ``seconds`` in which this process only sleeps."""
    window = Window()
    time.sleep(seconds)
    return window.close()


def bfloat16_support(cpuinfo: str) -> str:
    """What the CPU offers for bfloat16, from ``/proc/cpuinfo``'s text: AMX tiles, the AVX-512
    dot-product instructions, or neither (the framework then converts to float32 and back)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 names them flags, ARM Features
            flags.update(value.split())
    if "amx_bf16" in flags:
        return "AMX (amx_bf16)"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "bf16" in flags:  # ARMv8.6's BFDOT/BFMMLA
        return "Arm BF16 (bf16)"
    return "neither: bfloat16 is emulated"


def cpu_bfloat16(path: str = "/proc/cpuinfo") -> str | None:
    """:func:`bfloat16_support` of this machine, None where ``/proc/cpuinfo`` cannot be read."""
    try:
        with open(path) as f:
            return bfloat16_support(f.read())
    except OSError:
        return None
