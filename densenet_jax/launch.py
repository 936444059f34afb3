"""How JAX processes are started, known without importing JAX (``common.registry.launch_spec``
reads this module without the package's ``__init__``; it imports no framework).

A local distributed job is ``jax.distributed``: each worker gets the coordinator's address, its
process id and the count (``densenet_jax.distributed`` reads the ``DENSENET_JAX_*`` variables);
the coordinator is bound to loopback, since without a bind address it listens on every interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.distributed.engine import LOOPBACK, Engine
from common.registry import Launch


class JaxEngine(Engine):
    def worker_env(self, rank: int, world: int, ports: Sequence[int], workdir: Path) -> dict[str, str]:
        return {
            "DENSENET_JAX_COORDINATOR": f"{LOOPBACK}:{ports[0]}",
            "DENSENET_JAX_BIND": f"{LOOPBACK}:{ports[0]}",
            "DENSENET_JAX_PROCESS_ID": str(rank),
            "DENSENET_JAX_NUM_PROCESSES": str(world),
        }


LAUNCH = Launch(
    engine=JaxEngine(
        name="jax.distributed + jit over a device Mesh",
        ports=1,
        across_machines="coordinator address, process id and count",
    ),
)
