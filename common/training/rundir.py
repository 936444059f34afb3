"""The run directory: what a training run writes, how, and who may write it.

A run directory holds ``run.json`` (settings, versions, the data read with SHA-256s, the starting
weights), ``metrics.jsonl`` (one line per epoch), ``steps.jsonl`` (one line per training step:
its loss and learning rate), ``checkpoint.safetensors`` (canonical weights and velocities after
the last finished epoch), ``weights.safetensors`` (the final weights, loadable by any backend)
and ``curves.png``. :class:`RunDir` owns them: it refuses a directory that training would have
to destroy, holds an exclusive lock for the whole run (one writer per directory), writes every
file atomically, and says what is kept when a run stops. Nothing is written before the first
epoch finishes; a run stopped before then leaves the directory as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.config import DenseNetConfig
from common.errors import WeightFileError
from common.training.settings import TrainingError
from common.weights.canonical import CanonicalFile, load_canonical, save_weights

__all__ = [
    "LOCK_ENV",
    "LOCK_FILE",
    "RUN_FILES",
    "RunDir",
    "RunDirBusy",
    "RunWriteError",
    "metrics_text",
    "read_metrics_file",
    "read_steps_file",
]

# What a run directory holds; a directory with any of them holds a run.
RUN_FILES = ("run.json", "metrics.jsonl", "steps.jsonl", "checkpoint.safetensors", "weights.safetensors", "curves.png")
# The lock every writer of a run directory holds (flock: the kernel drops it when its holder
# dies, so a lock left by a dead process is taken over without asking anyone).
LOCK_FILE = ".densenet.lock"
# Set by a launcher that holds the lock for its workers: "<pid>:<directory>".
LOCK_ENV = "DENSENET_RUN_LOCK"
# Environmental failures (a full disk, no permission): the user's to fix, exit status 2.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class RunDirBusy(TrainingError):
    """Another process is writing the run directory."""


class RunWriteError(TrainingError):
    """A run file could not be written; the message says what is safe and how to go on."""


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN or infinity; Python's json would write a bare NaN, which no parser accepts.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def metrics_text(metrics: list[dict[str, Any]]) -> str:
    """``metrics.jsonl``: one JSON object per line, non-finite numbers as null."""
    return "".join(json.dumps({k: _finite_or_none(v) for k, v in m.items()}, allow_nan=False) + "\n" for m in metrics)


def _json_lines(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, line, value)`` for every non-empty line; a line that is not JSON (a
    truncated write) is a :class:`TrainingError` naming the file and the line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path} cannot be read ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, line, json.loads(line)
        except ValueError:
            raise TrainingError(f"{path} line {number} is not valid JSON (a truncated file?): {line[:60]!r}") from None


def read_metrics_file(path: Path, epochs: int | None = None) -> list[dict[str, Any]]:
    """The per-epoch metrics of ``path`` (the first ``epochs`` of them, which must all be there).

    A missing file, a line that is not a JSON object or too few epochs is a
    :class:`TrainingError` that names the file and the line.
    """
    if not path.is_file():
        raise TrainingError(f"{path} does not exist")
    metrics = []
    for number, line, value in _json_lines(path):
        if epochs is not None and len(metrics) == epochs:
            break
        if not isinstance(value, dict) or "epoch" not in value:
            raise TrainingError(f"{path} line {number} is not an epoch's metrics: {line[:60]!r}")
        metrics.append(value)
    if epochs is not None and len(metrics) < epochs:
        raise TrainingError(f"{path} holds {len(metrics)} epoch(s), expected {epochs}")
    return metrics


def read_steps_file(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The per-step records of the first ``epochs`` epochs in ``path``, which must exist."""
    if not path.is_file():
        raise TrainingError(f"{path} does not exist")
    return [
        value
        for _, _, value in _json_lines(path)
        if isinstance(value, dict) and isinstance(value.get("epoch"), int) and value["epoch"] <= epochs
    ]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_ancestor(pid: int) -> bool:
    """Whether ``pid`` started this process, directly or through a few wrappers (a launcher that
    runs its workers in a network namespace); read from /proc, False where it cannot be read."""
    current = os.getppid()
    for _ in range(8):
        if current == pid:
            return True
        if current <= 1:
            return False
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            current = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


class RunDir:
    """One run directory, as one call of training sees it.

    ``writer``: whether this process writes the files (worker 0 of a data-parallel run; the
    others read the checkpoint and never write).
    """

    def __init__(self, path: str | os.PathLike, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.created = False  # whether this call made the directory (removed again if left empty)
        self.wrote = False  # whether this call has written a run file yet
        self.checkpoint_epoch: int | None = None  # the epoch the checkpoint holds, if there is one
        self._written: set[str] = set()  # the run files this call wrote
        self._lock_fd: int | None = None

    # -- paths ---------------------------------------------------------------------------------

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.safetensors"

    @property
    def weights(self) -> Path:
        return self.path / "weights.safetensors"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    def files(self) -> list[str]:
        """The run artefacts the directory already holds."""
        return [name for name in RUN_FILES if (self.path / name).exists()] if self.path.is_dir() else []

    def describe(self) -> str:
        """``a torch run of 3 epoch(s)``, from the files (``a run`` if they cannot be read)."""
        try:
            settings = json.loads((self.path / "run.json").read_text())["settings"]
            metrics = self.path / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            return f"a {settings['backend']} run of {sum(1 for line in lines if line.strip())} epoch(s)"
        except (OSError, ValueError, KeyError, TypeError):
            return "a run"

    # -- before anything starts ------------------------------------------------------------------

    def check(self, *, resume: bool = False, overwrite: bool = False) -> RunDir:
        """Refuse a directory that training would have to destroy or cannot write, before any work.

        A directory that already holds a run is continued (``resume``), replaced (``overwrite``)
        or refused; a file, or a path that cannot be created or written, is refused.
        """
        out = self.path
        if resume and overwrite:
            raise TrainingError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out {out} is a file, not a directory; name a directory for the run")
        if resume:
            if not self.checkpoint.is_file():
                raise TrainingError(f"--resume: {self.checkpoint} does not exist (no epoch of a run there finished)")
        elif not overwrite and self.files():
            raise TrainingError(
                f"{out} already holds {self.describe()} ({', '.join(self.files())}); continue it with --resume, "
                "train into a new --out, or replace it with --overwrite"
            )
        parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise TrainingError(f"--out {out}: {parent} is not a directory this user can write in")
        return self

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the directory's exclusive lock for the block (creating the directory if needed).

        A second writer is refused with the holder's pid. A launcher that holds the lock for its
        workers says so in ``$DENSENET_RUN_LOCK``; its worker 0 then writes under that lock. On the
        way out, a directory this call made and left empty is removed, lock file and all.
        """
        holder, _, where = os.environ.get(LOCK_ENV, "").partition(":")
        if holder.isdigit() and _is_ancestor(int(holder)) and Path(where) == self.path.resolve():
            yield self
            return
        self._acquire()
        try:
            self._remove_temporaries()
            yield self
        finally:
            self._release()

    def _acquire(self) -> None:
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"--out {self.path}: cannot create it ({exc.strerror or exc})") from None
        lock = self.path / LOCK_FILE
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise self._write_error(lock, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirBusy(
                    f"{self.path} is being written by another densenet process (pid {holder}); wait for it to "
                    "finish, stop it, or train into a new --out"
                ) from None
            # The holder before us may have removed the file on its way out: lock the file that is there.
            if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.created and not self.wrote and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def lock_env(self) -> dict[str, str]:
        """What a launcher holding the lock passes to its workers (:meth:`locked` reads it)."""
        return {LOCK_ENV: f"{os.getpid()}:{self.path.resolve()}"}

    def _remove_temporaries(self) -> None:
        """Remove what an interrupted atomic write left (``.checkpoint.safetensors.<hex>.tmp``...);
        only the run files' own, and only under the lock, so no live write is touched."""
        for name in RUN_FILES:
            for tmp in self.path.glob(f".{name}*.tmp"):
                tmp.unlink(missing_ok=True)

    # -- reading a run to continue it ------------------------------------------------------------

    def load_checkpoint(self, config: DenseNetConfig) -> CanonicalFile:
        return load_canonical(self.checkpoint, config)

    def read_metrics(self, epochs: int) -> list[dict[str, Any]]:
        return read_metrics_file(self.path / "metrics.jsonl", epochs)

    def read_steps(self, epochs: int) -> list[dict[str, Any]]:
        return read_steps_file(self.path / "steps.jsonl", epochs)

    def recorded_init(self) -> Any:
        """The starting weights the run recorded in ``run.json`` (None if it cannot be read)."""
        try:
            return json.loads((self.path / "run.json").read_text()).get("init")
        except (OSError, ValueError, AttributeError):
            return None

    # -- writing -----------------------------------------------------------------------------------

    def begin(self, run_info: dict[str, Any], overwrite: bool) -> None:
        """Before the first epoch's files: replace an earlier run (``overwrite``), write run.json."""
        if self.wrote:
            return
        if overwrite:
            for name in self.files():  # only the artefacts of a run: nothing else the directory holds
                (self.path / name).unlink()
        self.write_text("run.json", json.dumps(run_info, indent=2) + "\n")
        self.wrote = True

    def write_text(self, name: str, text: str) -> None:
        path = self.path / name
        try:
            _write_atomic(path, text)
        except OSError as exc:
            raise self._write_error(path, exc) from None
        self._written.add(name)

    def save(self, name: str, *args: Any, **kwargs: Any) -> None:
        """:func:`common.weights.canonical.save_weights` into ``name``, a failure said as :meth:`write_text` does."""
        path = self.path / name
        try:
            save_weights(path, *args, **kwargs)
        except (OSError, WeightFileError) as exc:
            # The weight writer words an OSError as its own error; the cause says what happened.
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if not isinstance(cause, OSError):
                raise
            raise self._write_error(path, cause) from None
        self._written.add(name)

    def abandon(self) -> None:
        """After a run stopped before any checkpoint: remove the files this call wrote, which
        hold nothing to continue, so the directory is as the run found it (but an earlier run
        that ``overwrite`` already replaced)."""
        if self.checkpoint_epoch or not self.wrote:
            return
        for name in self._written:
            (self.path / name).unlink(missing_ok=True)
        self._written.clear()
        self.wrote = False

    def _write_error(self, path: Path, exc: OSError) -> RunWriteError:
        error = RunWriteError(f"cannot write {path} ({exc.strerror or exc}); {self.kept()}; {self.how_to_go_on()}")
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            error.exit_status = 1
        return error

    # -- what is kept ------------------------------------------------------------------------------

    def kept(self) -> str:
        """What the directory holds for the user now, in one clause."""
        if self.checkpoint_epoch:
            return f"{self.checkpoint} holds the weights after epoch {self.checkpoint_epoch}, intact"
        if self.files() and not self.wrote:
            return f"no epoch finished, so nothing was written: the run in {self.path} is as it was"
        return f"no epoch finished, so nothing was kept in {self.path}"

    def how_to_go_on(self) -> str:
        if self.checkpoint_epoch:
            return "continue with the same command and --resume"
        return "start again with the same command"
