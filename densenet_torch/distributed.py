"""Data-parallel training with torch.distributed and DistributedDataParallel (docs/distributed.md).

Gloo on CPU; the same code takes NCCL when the tensors are on GPUs (one process per GPU). Each
worker computes its shard's loss and DistributedDataParallel averages the gradients during
``backward``; ``torch.optim.SGD``, configured for ``model.sgd``, then steps identical weights
(and velocities) on every worker. BatchNorm
normalises with the worker's own batch statistics (what DDP does); the running statistics are
then averaged over the workers with ``all_reduce`` (instead of DDP's broadcast of worker 0's
buffers), so that every worker evaluates, and worker 0 saves, the same network.

``--sync-bn`` (``torch.nn.SyncBatchNorm``) is refused: PyTorch implements it for CUDA (and
XPU/HPU) tensors only and raises ``SyncBatchNorm expected input tensor to be on GPU`` on CPU,
where this suite's PyTorch backend runs (``densenet_torch.launch.SYNC_BN_REFUSAL``).

A worker that goes away closes its gloo connections; the others' collectives then fail with
``Connection closed by peer``, which :meth:`TorchGroup.peer_gone` tells from this worker's own
errors, so that the command says so in one line (``common.distributed.group.PeerLost``).
"""

from __future__ import annotations

import os
import re
import warnings
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.adapter import Model
from common.config import DenseNetConfig
from common.distributed.group import DistributedError, Group, check_sync_bn, collective, telling_line
from densenet_torch.adapter import TorchAdapter
from densenet_torch.optim import make_optimizer


def optimizer(model: Model, lr: float) -> torch.optim.Optimizer:
    """The optimiser every distributed step uses (the one place it is made): ``torch.optim.SGD``
    for ``model.sgd`` (``densenet_torch.optim.make_optimizer``), kept where the adapter keeps
    it, so ``get_optimizer_state``/``set_optimizer_state`` read and write its velocities. It
    steps after DDP averaged the gradients: the velocities are the same on every worker."""
    opt = model.runtime.sgd
    if opt is None:
        opt = model.runtime.sgd = make_optimizer(model.net.parameters(), model.sgd)
    for group in opt.param_groups:
        group["lr"] = lr
    return opt


class TorchGroup(Group):
    backend = "torch"

    def __init__(self, timeout_s: float) -> None:
        # torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (env://); the local launcher a file store.
        init = os.environ.get("DENSENET_TORCH_INIT", "env://")
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except (KeyError, ValueError):
            raise DistributedError(
                "torch.distributed: RANK and WORLD_SIZE are not set; start the workers with torchrun "
                "(or densenet train --workers N)"
            ) from None
        try:
            dist.init_process_group(
                "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
            )
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"torch.distributed could not start ({init}): {exc}") from None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.replicas = self.world
        self._ddp: dict[int, DistributedDataParallel] = {}  # by id(model)

    @collective  # DistributedDataParallel broadcasts worker 0's weights
    def build(self, adapter: TorchAdapter, config: DenseNetConfig, seed=0, dtype="float32", sync_bn=False) -> Model:
        if sync_bn:
            check_sync_bn(self.backend)  # refused, with why
        model = adapter.build(config, seed=seed, dtype=dtype)
        # broadcast_buffers=False: running statistics are averaged after each step instead. PyTorch
        # 2.13 deprecates the name in favour of forward_sync_buffers, which would still broadcast
        # worker 0's buffers once at start; the old name is the one that means what is meant here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self._ddp[id(model)] = DistributedDataParallel(model.net, broadcast_buffers=False)
        return model

    def _buffers(self, model: Model) -> list[torch.Tensor]:
        return [b for name, b in model.net.named_buffers() if name.endswith(("running_mean", "running_var"))]

    @collective
    def train_step(self, adapter, model, X, y, lr):
        opt = optimizer(model, lr)
        opt.zero_grad(set_to_none=True)
        X = adapter.prepare(model, X)
        y = torch.from_numpy(adapter.check_labels(X, y, model.config.num_classes))
        model.net.train(True)
        logits = self._ddp[id(model)](X)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        opt.step()
        with torch.no_grad():
            handles = [dist.all_reduce(b, async_op=True) for b in self._buffers(model)]
            total = loss.detach().clone()
            handles.append(dist.all_reduce(total, async_op=True))
            for h in handles:
                h.wait()
            for b in self._buffers(model):
                b.div_(self.world)
        return float(total) / self.world, logits.detach().numpy()

    def set_weights(self, adapter, model, weights):
        adapter.set_weights(model, weights)

    def get_weights(self, adapter, model):
        return adapter.get_weights(model)

    def forward(self, adapter, model, X):
        return adapter.forward(model, X)

    @collective
    def sum(self, values: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.array(values, dtype=np.float64))
        dist.all_reduce(t)
        return t.numpy()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def peer_gone(self, exc: Exception) -> str | None:
        # gloo's errors are RuntimeErrors (DistBackendError in recent PyTorch) that name gloo: a
        # peer's closed connection, or a collective it did not join within the timeout.
        message = str(exc)
        if isinstance(exc, RuntimeError) and re.search(r"gloo|connection (closed|reset) by peer", message, re.I):
            return telling_line(message, r"peer|timed out|connection")
        return None


def connect(timeout_s: float = 120.0) -> TorchGroup:
    """Join the group described by the environment (torchrun's, or the local launcher's)."""
    return TorchGroup(timeout_s)
