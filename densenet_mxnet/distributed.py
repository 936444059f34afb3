"""Data-parallel training with MXNet's ``dist_sync`` kvstore (docs/distributed.md).

ps-lite's scheduler, one server and the workers are started by MXNet's ``tools/launch.py`` or by
``common.distributed.launch`` (the ``DMLC_*`` variables); ``python -m densenet_mxnet.distributed``
with ``DMLC_ROLE=scheduler`` or ``server`` is such a process (importing MXNet runs the role).
Each worker pushes its gradients to the kvstore, pulls their sum and steps identical weights (and
velocities) with a local Gluon ``Trainer`` running ``model.sgd`` (``SuiteSGD``); BatchNorm
normalises with the worker's own batch statistics, and the running statistics are averaged
through the same kvstore after each step.

``--sync-bn`` is refused: ``gluon.contrib.nn.SyncBatchNorm`` synchronises the GPUs of one
process through an in-process buffer, never across kvstore processes
(``densenet_mxnet.launch.SYNC_BN_REFUSAL``). One distributed model per process (the Trainer
numbers its kvstore keys from 0), in float32 (the kvstore carries float32).
"""

from __future__ import annotations

import os

import numpy as np

from common.adapter import Model
from common.config import DenseNetConfig
from common.distributed.group import DistributedError, Group, check_sync_bn
from densenet_mxnet._compat import mxnet as mx
from densenet_mxnet.adapter import MXNetAdapter
from densenet_mxnet.optim import make_optimizer

gluon = mx.gluon
# Our own kvstore keys (running statistics, sums) start here, far above the Trainer's 0..P-1.
_FIRST_KEY = 1_000_000


def optimizer(model: Model) -> gluon.Trainer:
    """The optimiser every distributed step uses (the one place it is made): ``SuiteSGD`` for
    ``model.sgd`` (``densenet_mxnet.optim.make_optimizer``) in a local Trainer, kept where the adapter keeps it
    (its Updater's states are the velocities ``get_optimizer_state`` reads), fed the gradients the
    kvstore summed: every worker updates the same velocities with the same gradients.

    Not the Trainer's own kvstore path (``kvstore=kv, update_on_kvstore=False``): its first step
    pulls the initial weights from the kvstore while the same step pushes the gradients, with
    nothing ordering the two, and in one of a few test runs here a worker got the summed gradients
    back as its weights."""
    trainer = model.runtime.trainer
    if trainer is None:
        trainer = model.runtime.trainer = gluon.Trainer(
            model.net.collect_params(), make_optimizer(model.sgd), kvstore=None
        )
    return trainer


class MXNetGroup(Group):
    backend = "mxnet"

    def __init__(self, timeout_s: float) -> None:
        role = os.environ.get("DMLC_ROLE")
        if role != "worker":
            raise DistributedError(
                f"DMLC_ROLE is {role!r}: start the workers with MXNet's tools/launch.py (or densenet train --workers N)"
            )
        # ps-lite has no rendezvous timeout of its own: the launcher bounds the job (timeout_s unused).
        self.kv = mx.kv.create("dist_sync")
        self.rank, self.world = self.kv.rank, self.kv.num_workers
        self.replicas = self.world
        self._keys: dict[object, int] = {}
        self._models = 0

    def _key(self, what: object, like: mx.nd.NDArray) -> int:
        if what not in self._keys:
            self._keys[what] = _FIRST_KEY + len(self._keys)
            self.kv.init(self._keys[what], mx.nd.zeros(like.shape, dtype=like.dtype))
        return self._keys[what]

    def _allreduce(self, what: object, value: mx.nd.NDArray) -> mx.nd.NDArray:
        key = self._key(what, value)
        self.kv.push(key, value)
        out = mx.nd.zeros(value.shape, dtype=value.dtype)
        self.kv.pull(key, out=out)
        return out

    def build(self, adapter: MXNetAdapter, config: DenseNetConfig, seed=0, dtype="float32", sync_bn=False) -> Model:
        if sync_bn:
            check_sync_bn(self.backend)  # refused, with why
        if dtype != "float32":
            # Measured: a float64 step through dist_sync lands float32 roundings away from the
            # float64 oracle (weights 3e-10, running statistics 7e-8 relative): values cross
            # ps-lite in float32.
            raise DistributedError("MXNet's dist_sync kvstore carries float32 only; distributed MXNet runs in float32")
        if self._models:
            raise DistributedError("one distributed MXNet model per process (the Trainer's kvstore keys start at 0)")
        self._models += 1
        return adapter.build(config, seed=seed, dtype=dtype)

    def train_step(self, adapter, model, X, y, lr):
        model.net.hybridize(True)
        trainer = optimizer(model)
        loss, logits = adapter._loss_backward(model, adapter.prepare(model, X), y)
        for name, p in adapter._tensors(model).items():
            if p.grad_req == "null":  # running statistics: the mean of the workers' updates
                p.set_data(self._allreduce(name, p.data()) / self.world)
            else:  # gradients: the sum of the workers' mean-loss gradients
                p.grad()[:] = self._allreduce(f"{name}.grad", p.grad())
        trainer.set_learning_rate(lr)
        trainer.step(self.world)  # rescaled by 1/world: the mean of the workers' gradients
        total = self._allreduce("loss", mx.nd.array([loss], dtype="float64"))
        return float(total.asscalar()) / self.world, logits.asnumpy()

    def set_weights(self, adapter, model, weights):
        adapter.set_weights(model, weights)

    def get_weights(self, adapter, model):
        return adapter.get_weights(model)

    def forward(self, adapter, model, X):
        return adapter.forward(model, X, compiled=True)

    def sum(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.float64)
        return self._allreduce(("sum", values.shape), mx.nd.array(values, dtype="float64")).asnumpy()

    def close(self) -> None:
        pass  # the kvstore ends with the process (ps-lite's finalisation tells the scheduler)


def connect(timeout_s: float = 120.0) -> MXNetGroup:
    """Join the ps-lite job the DMLC_* variables describe, as a worker."""
    return MXNetGroup(timeout_s)


if __name__ == "__main__":
    # Scheduler or server: importing MXNet (above) ran the role until the workers finished.
    raise SystemExit(0)
