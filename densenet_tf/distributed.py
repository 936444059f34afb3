"""Data-parallel training with tf.distribute.MultiWorkerMirroredStrategy (docs/distributed.md).

Each worker is one process with ``TF_CONFIG`` naming the cluster and its own index; the network
and the optimiser (``model.sgd``'s ``SuiteSGD``) are made in the strategy's scope (mirrored
variables, velocities included), and every step runs the replica function with ``strategy.run``.
Keras's optimiser all-reduces (sums) the gradients across the replicas; each replica's gradient
of its shard's mean loss is divided by the number of replicas first, so the step uses their mean.
BatchNorm normalises with the replica's own batch statistics, or with the global batch's
(``--sync-bn``: Keras ``BatchNormalization(synchronized=True)``, whose moments are all-reduced sums
of x and x^2 over the replicas). The running statistics are put in the canonical convention with
the count their batch variance averaged over, then averaged over the replicas (``all_reduce`` in
the replica context).

TensorFlow's gRPC server binds every interface whatever ``TF_CONFIG`` says (common.distributed.launch).
A worker that goes away breaks the others' collectives (``UnavailableError``: the connection reset
by the peer), which :meth:`TFGroup.peer_gone` tells from this worker's own errors, so that the
command says so in one line (``common.distributed.group.PeerLost``).
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from common.adapter import Model
from common.config import DenseNetConfig
from common.distributed.group import DistributedError, Group, collective, telling_line
from densenet_tf.adapter import TFAdapter
from densenet_tf.optim import make_optimizer


def optimizer(
    adapter: TFAdapter, model: Model, strategy: tf.distribute.Strategy, lr: float | None = None
) -> keras.optimizers.Optimizer:
    """The optimiser every distributed step uses (the one place it is made): ``SuiteSGD`` for
    ``model.sgd`` (``densenet_tf.optim.make_optimizer``, its learning rate a variable in the
    model's dtype), made and built in the strategy's scope so that its velocities are mirrored
    variables, and kept where the adapter finds them (``get_optimizer_state``). Keras all-reduces
    the gradients before ``update_step``: the velocities are the same on every replica."""
    opt = model.runtime.sgd
    if opt is None:
        with strategy.scope():
            opt = make_optimizer(model.sgd, model.dtype)
            opt.build([v for v in adapter._tensors(model).values() if v.trainable])
        model.runtime.sgd = opt
    if lr is not None:
        opt.learning_rate.assign(lr)
    return opt


class TFGroup(Group):
    backend = "tf"

    def __init__(self, timeout_s: float) -> None:
        try:
            task = json.loads(os.environ["TF_CONFIG"])["task"]
            self.rank = int(task["index"])
        except (KeyError, ValueError, TypeError):
            raise DistributedError(
                "TF_CONFIG is missing or names no task index: give every worker its TF_CONFIG "
                "(or use densenet train --workers N)"
            ) from None
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        self.replicas = self.strategy.num_replicas_in_sync
        self.world = self.strategy.cluster_resolver.cluster_spec().num_tasks("worker")
        # By id(model): the traced step and the optimiser it holds (a new one after configure_optimizer).
        self._steps: dict[int, tuple[keras.optimizers.Optimizer, tf.types.experimental.GenericFunction]] = {}
        self._sync: dict[int, bool] = {}

    @collective  # mirrored variables take worker 0's initial values
    def build(self, adapter: TFAdapter, config: DenseNetConfig, seed=0, dtype="float32", sync_bn=False) -> Model:
        with self.strategy.scope():
            model = adapter.build(config, seed=seed, dtype=dtype)
        if sync_bn:
            for kind, layer in adapter._layers(model):
                if kind == "bn":
                    layer.synchronized = True  # read on every call: moments all-reduced over replicas
        self._sync[id(model)] = sync_bn
        return model

    def _replica_step(self, adapter: TFAdapter, model: Model, X: tf.Tensor, y: tf.Tensor, opt):
        ctx = tf.distribute.get_replica_context()
        tensors = adapter._tensors(model)
        variables = {k: v for k, v in tensors.items() if v.trainable}
        counted = X.shape[0] * (self.replicas if self._sync[id(model)] else 1)
        factors = adapter.running_stat_factors(model, (counted, X.shape[3], X.shape[1], X.shape[2]))
        stats = [k for k in tensors if not tensors[k].trainable]
        old = {k: tf.identity(tensors[k]) for k in stats}
        with tf.GradientTape() as tape:
            logits = model.net(X, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        grads = tape.gradient(loss, list(variables.values()))
        scale = tf.constant(1 / self.replicas, loss.dtype)
        opt.apply_gradients([(g * scale, v) for g, v in zip(grads, variables.values())])
        for k in stats:
            new = tensors[k]
            if k in factors:
                new = adapter.canonical_running_stat(old[k], new, factors[k])
            tensors[k].assign(ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tf.identity(new)))
        return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, loss), logits

    @collective
    def train_step(self, adapter, model, X, y, lr):
        opt = optimizer(adapter, model, self.strategy, lr)
        X = adapter.prepare(model, X)
        y = tf.convert_to_tensor(adapter.check_labels(X, y, model.config.num_classes))
        traced, step = self._steps.get(id(model), (None, None))
        if traced is not opt:

            @tf.function
            def step(X, y):
                return self.strategy.run(lambda X, y: self._replica_step(adapter, model, X, y, opt), args=(X, y))

            self._steps[id(model)] = opt, step
        loss, logits = step(X, y)
        loss = self.strategy.experimental_local_results(loss)[0]
        logits = self.strategy.experimental_local_results(logits)[0]
        return float(loss), logits.numpy()

    @collective
    def get_optimizer_state(self, adapter, model):
        optimizer(adapter, model, self.strategy)  # not the adapter's: made outside the scope
        return adapter.get_optimizer_state(model)

    @collective
    def set_optimizer_state(self, adapter, model, state):
        optimizer(adapter, model, self.strategy)
        adapter.set_optimizer_state(model, state)  # assigns every mirrored copy the same values

    def set_weights(self, adapter, model, weights):
        adapter.set_weights(model, weights)  # assigns every mirrored copy the same values

    def get_weights(self, adapter, model):
        return adapter.get_weights(model)

    def forward(self, adapter, model, X):
        return adapter.forward(model, X, compiled=True)

    @collective
    def sum(self, values: np.ndarray) -> np.ndarray:
        value = tf.constant(np.asarray(values, np.float64))
        per = self.strategy.run(lambda v: tf.distribute.get_replica_context().all_reduce("sum", v), args=(value,))
        return self.strategy.experimental_local_results(per)[0].numpy()

    def close(self) -> None:
        pass  # MultiWorkerMirroredStrategy has no shutdown; the collectives end with the process

    def peer_gone(self, exc: Exception) -> str | None:
        # A collective whose peer vanished: gRPC's UNAVAILABLE (connection reset or refused), a
        # deadline passed waiting for it, or the collective aborted or cancelled because of it.
        if isinstance(exc, _PEER_ERRORS):
            return telling_line(str(exc), r"connection|socket|peer|unavailable|deadline")
        return None


_PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)


def connect(timeout_s: float = 120.0) -> TFGroup:
    """Join the cluster ``TF_CONFIG`` describes; must run before any other TensorFlow work."""
    return TFGroup(timeout_s)
