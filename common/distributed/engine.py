"""How one distributed engine's workers are started on one machine: the recipe each backend
gives the local launcher (:mod:`common.distributed.launch`).

Each backend package holds its engine's recipe in its ``launch.py`` (``LAUNCH.engine``, a
subclass of :class:`Engine`), a module that imports no framework and that the registry reads
without importing the package (``common.registry.launch_spec``). The launcher thus knows every
engine, and starts its workers, without importing a framework, and nothing in ``common`` holds
one backend's particulars. docs/distributed.md describes the engines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Every socket of a local job binds this address (docs/distributed.md, "Ports and interfaces").
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Helper:
    """A process the engine needs beside the workers (MXNet's ps-lite scheduler and server)."""

    name: str
    """As the launcher's messages name it (``the MXNet scheduler``)."""
    argv: Sequence[str]
    env: Mapping[str, str]
    """Set on top of the launcher's environment."""


@dataclass(frozen=True)
class Engine:
    """One backend's distributed engine: what the documentation and the local launcher know of it."""

    name: str
    """The engine as people know it (``tf.distribute.MultiWorkerMirroredStrategy``)."""
    ports: int
    """Loopback ports one local job needs (:meth:`ports_for` may need more per worker)."""
    across_machines: str
    """The engine's own way across machines, in one line (docs/distributed.md has the commands)."""
    sync_bn_refusal: str | None = None
    """Why ``--sync-bn`` is refused, where the engine has no BatchNorm synchronised across processes."""
    wildcard_bind: str | None = None
    """Who binds every interface whatever they are told (``TensorFlow's workers``), so that the
    launcher runs the job in a private network namespace; None: every socket binds as told."""

    def ports_for(self, workers: int) -> int:
        """The free loopback ports a job of ``workers`` workers needs."""
        return self.ports

    def worker_env(self, rank: int, world: int, ports: Sequence[int], workdir: Path) -> dict[str, str]:
        """The environment of local worker ``rank`` of ``world``, what the engine's own launcher
        would set; ``ports`` from :meth:`ports_for`, ``workdir`` a directory private to the job."""
        raise NotImplementedError(f"{type(self).__name__} starts no local workers")

    def helpers(self, world: int, ports: Sequence[int]) -> list[Helper]:
        """The processes to start before the workers (none for most engines)."""
        return []
