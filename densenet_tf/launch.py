"""How TensorFlow processes are started, known without importing TensorFlow
(``common.registry.launch_spec`` reads this module without the package's ``__init__``; it imports
no framework).

A local distributed job is ``MultiWorkerMirroredStrategy``: each worker gets ``TF_CONFIG`` with
the cluster (one port per worker) and its own index. TensorFlow's gRPC server binds every
interface whatever ``TF_CONFIG`` says, so the launcher runs the job in a private network
namespace where it can (``wildcard_bind``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from common.distributed.engine import LOOPBACK, Engine
from common.registry import Launch


class TFEngine(Engine):
    def ports_for(self, workers: int) -> int:
        return workers  # each worker's gRPC server

    def worker_env(self, rank: int, world: int, ports: Sequence[int], workdir: Path) -> dict[str, str]:
        cluster = {"worker": [f"{LOOPBACK}:{p}" for p in ports[:world]]}
        return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}})}


LAUNCH = Launch(
    engine=TFEngine(
        name="tf.distribute.MultiWorkerMirroredStrategy",
        ports=0,
        across_machines="TF_CONFIG per worker",
        wildcard_bind="TensorFlow's workers",
    ),
)
