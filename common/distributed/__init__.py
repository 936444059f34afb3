"""Data-parallel training on each framework's own distributed engine (docs/distributed.md).

What is the same for every engine lives here and imports no framework: how an epoch's seeded
permutation is cut into per-worker shards (:mod:`.sharding`), the local launcher that picks
loopback ports, starts the workers (and MXNet's scheduler and server) with the environment each
backend's ``launch.py`` gives (:mod:`.engine`) and stops them all when one fails, on Ctrl-C,
SIGTERM or SIGHUP, and when the launcher itself dies (:mod:`.launch`), and the interface
every backend's ``distributed.py`` offers (:mod:`.group`). The collectives are the engines' own:
DistributedDataParallel/gloo, a jit over a JAX device mesh, MultiWorkerMirroredStrategy and the
MXNet ``dist_sync`` kvstore.
"""

from common.distributed.group import (
    DistributedError,
    Group,
    PeerLost,
    SyncBatchNormUnavailable,
    check_sync_bn,
    connect,
    in_worker,
    job_timeout_s,
)
from common.distributed.launch import engine_for, free_ports, launch, without_option, worker_env
from common.distributed.sharding import check_divisible, shard_batches, shard_range

__all__ = [
    "DistributedError",
    "Group",
    "PeerLost",
    "SyncBatchNormUnavailable",
    "check_divisible",
    "check_sync_bn",
    "connect",
    "engine_for",
    "free_ports",
    "in_worker",
    "job_timeout_s",
    "launch",
    "shard_batches",
    "shard_range",
    "without_option",
    "worker_env",
]
