"""How PyTorch processes are started, known without importing PyTorch (``common.registry.launch_spec``
reads this module without the package's ``__init__``; it imports no framework).

Training and benchmark processes run on TCMalloc (``common.process.allocator``: PyTorch takes every
CPU tensor from ``malloc``). A local distributed job is ``torch.distributed`` with gloo: each
worker gets what ``torchrun`` would set, except the rendezvous, which goes through a file instead
of torchrun's TCPStore (whose server binds every interface), and gloo stays on ``lo``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.distributed.engine import Engine
from common.registry import Launch

SYNC_BN_REFUSAL = (
    "torch.nn.SyncBatchNorm runs on GPUs only (PyTorch raises 'SyncBatchNorm expected input tensor to be on "
    "GPU' for CPU tensors) and this suite's PyTorch backend runs on the CPU; train without --sync-bn "
    "(per-worker BatchNorm statistics, what DistributedDataParallel does)"
)


class TorchEngine(Engine):
    def worker_env(self, rank: int, world: int, ports: Sequence[int], workdir: Path) -> dict[str, str]:
        return {
            "DENSENET_TORCH_INIT": f"file://{workdir / 'torch-store'}",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "GLOO_SOCKET_IFNAME": "lo",
        }


LAUNCH = Launch(
    malloc="tcmalloc",
    engine=TorchEngine(
        name="torch.distributed + DistributedDataParallel (gloo)",
        ports=0,
        across_machines="torchrun --nnodes/--rdzv-endpoint",
        sync_bn_refusal=SYNC_BN_REFUSAL,
    ),
)
