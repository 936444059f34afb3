"""How MXNet processes are started, known without importing MXNet (``common.registry.launch_spec``
reads this module without the package's ``__init__``; it imports no framework).

A memory-efficient network trains eagerly on MXNet's synchronous ``NaiveEngine``, which MXNet
reads from its environment once, when imported (``common.process.allocator`` says why), and every
result records the engine it ran on. A local distributed job is the ``dist_sync`` kvstore: ps-lite's
scheduler and one server beside the workers, each a process with its ``DMLC_*`` role, every
ps-lite socket bound to loopback (``DMLC_NODE_HOST``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.distributed.engine import LOOPBACK, Engine, Helper
from common.process.allocator import MXNET_ENGINE, SYNCHRONOUS_ENGINE, mxnet_engine
from common.registry import Launch

SYNC_BN_REFUSAL = (
    "MXNet's SyncBatchNorm (gluon.contrib.nn) synchronises the devices of one process through a shared "
    "in-process buffer, never across dist_sync kvstore processes; train without --sync-bn "
    "(per-worker BatchNorm statistics)"
)


def ps_env(role: str, world: int, ports: Sequence[int]) -> dict[str, str]:
    """The ``DMLC_*`` variables of one ps-lite process of a local job."""
    return {
        "DMLC_ROLE": role,
        "DMLC_PS_ROOT_URI": LOOPBACK,
        "DMLC_PS_ROOT_PORT": str(ports[0]),
        "DMLC_NUM_SERVER": "1",
        "DMLC_NUM_WORKER": str(world),
        "DMLC_NODE_HOST": LOOPBACK,  # every ps-lite socket binds this address
    }


class MXNetEngine(Engine):
    def worker_env(self, rank: int, world: int, ports: Sequence[int], workdir: Path) -> dict[str, str]:
        return ps_env("worker", world, ports)  # ps-lite numbers the workers itself

    def helpers(self, world: int, ports: Sequence[int]) -> list[Helper]:
        # `import mxnet` with a scheduler or server role runs that role (densenet_mxnet.distributed).
        argv = (sys.executable, "-m", "densenet_mxnet.distributed")
        return [Helper(f"the MXNet {role}", argv, ps_env(role, world, ports)) for role in ("scheduler", "server")]


class MXNetLaunch(Launch):
    def eager_env(self, base: Mapping[str, str], memory_efficient: bool) -> dict[str, str]:
        # A memory-efficient network on the NaiveEngine, unless `base` names an engine already.
        env = dict(base)
        if memory_efficient and not env.get(MXNET_ENGINE):
            env[MXNET_ENGINE] = SYNCHRONOUS_ENGINE
        return env

    def runtime_record(self) -> dict[str, str]:
        return {"mxnet_engine": mxnet_engine()}


LAUNCH = MXNetLaunch(
    engine=MXNetEngine(
        name="MXNet kvstore dist_sync (ps-lite)",
        ports=1,
        across_machines="tools/launch.py with a host file",
        sync_bn_refusal=SYNC_BN_REFUSAL,
    ),
)
