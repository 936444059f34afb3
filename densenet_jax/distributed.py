"""Data-parallel training with jax.distributed and a jit over a device Mesh (docs/distributed.md).

Every device of every process is one entry of a 1-D ``Mesh`` with axis ``"batch"``; images and
labels are global arrays sharded on that axis (``NamedSharding(mesh, P("batch"))``), weights and
the optimiser's velocities are replicated. Several processes join through
``jax.distributed.initialize`` (CPU collectives: gloo); one process can also drive several host
devices (``--xla_force_host_platform_device_count``).

``--sync-bn`` is the plain global-view step: ``jax.jit`` of the single-process step on the sharded
batch, where XLA computes each BatchNorm's batch mean and variance over the whole global batch
with all-reduces, so the step is the single-process one. Without it, ``jax.shard_map`` runs the
step per device, each BatchNorm normalising with its own shard's statistics, and ``lax.pmean``
averages the gradients, the loss and the running-statistic updates over the mesh.

A process that goes away breaks the others' gloo collectives; :meth:`JaxGroup.peer_gone` tells
that from this process's own errors, so that the command says so in one line
(``common.distributed.group.PeerLost``).
"""

from __future__ import annotations

import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from common.adapter import Model
from common.config import DenseNetConfig
from common.distributed.group import DistributedError, Group, collective, telling_line
from common.layout import to_layout
from common.training.optim import SGD
from densenet_jax.adapter import JaxAdapter, JaxRuntime, _x64, loss_value_and_grad
from densenet_jax.optim import make_optimizer

AXIS = "batch"


def optimizer(sgd: SGD, lr) -> optax.GradientTransformation:
    """The optimiser every distributed step uses (the one place it is made): the optax chain for
    ``model.sgd`` (``densenet_jax.optim.make_optimizer``; ``lr`` traced, one state for every rate).
    Its state is ``model.runtime.opt_state``, where the adapter reads and writes the velocities,
    replicated over the mesh; it is updated with the averaged gradients, so it stays replicated."""
    return make_optimizer(sgd, lr)


def _apply(sgd: SGD, params, grads, lr, opt_state):
    updates, opt_state = optimizer(sgd, lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@partial(jax.jit, static_argnums=(0, 1))
def _global_step(net, sgd, params, batch_stats, opt_state, X, y, lr, key, unbias):
    """The single-process step, on global arrays: BatchNorm over the whole (sharded) batch."""
    (loss, (batch_stats, logits)), grads = loss_value_and_grad(net, params, batch_stats, X, y, key, unbias)
    params, opt_state = _apply(sgd, params, grads, lr, opt_state)
    return loss, params, batch_stats, opt_state, logits


def _per_shard_step(mesh: Mesh):
    """The step run per device (BatchNorm on the device's shard), results averaged over the mesh."""

    def step(net, sgd, params, batch_stats, opt_state, X, y, lr, key, unbias):
        def per_shard(params, batch_stats, opt_state, X, y, lr, key, unbias):
            (loss, (stats, logits)), grads = loss_value_and_grad(net, params, batch_stats, X, y, key, unbias)
            loss, grads, stats = jax.lax.pmean((loss, grads, stats), AXIS)
            params, opt_state = _apply(sgd, params, grads, lr, opt_state)
            return loss, params, stats, opt_state, logits

        rep = P()
        return jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(rep, rep, rep, P(AXIS), P(AXIS), rep, rep, rep),
            out_specs=(rep, rep, rep, rep, P(AXIS)),
            # Without it JAX would already sum the gradients of the replicated weights over the
            # mesh (its varying-axes typing); pmean above is the one reduction, stated once.
            check_vma=False,
        )(params, batch_stats, opt_state, X, y, lr, key, unbias)

    return jax.jit(step, static_argnums=(0, 1))


class JaxGroup(Group):
    backend = "jax"

    def __init__(self, timeout_s: float) -> None:
        coordinator = os.environ.get("DENSENET_JAX_COORDINATOR")
        if coordinator:
            try:
                count = int(os.environ["DENSENET_JAX_NUM_PROCESSES"])
                index = int(os.environ["DENSENET_JAX_PROCESS_ID"])
            except (KeyError, ValueError):
                raise DistributedError(
                    "DENSENET_JAX_COORDINATOR is set: DENSENET_JAX_NUM_PROCESSES and DENSENET_JAX_PROCESS_ID "
                    "must be too (integers)"
                ) from None
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            try:
                jax.distributed.initialize(
                    coordinator_address=coordinator,
                    num_processes=count,
                    process_id=index,
                    # Without it the coordinator (process 0) binds every interface.
                    coordinator_bind_address=os.environ.get("DENSENET_JAX_BIND") or None,
                    initialization_timeout=max(1, int(timeout_s)),
                )
            except Exception as exc:  # noqa: BLE001 - XlaRuntimeError and friends; one message
                raise DistributedError(f"jax.distributed could not start ({coordinator}): {exc}") from None
        self.rank, self.world = jax.process_index(), jax.process_count()
        self.mesh = Mesh(np.array(jax.devices()), (AXIS,))
        self.replicas = self.mesh.size
        self._sync: dict[int, bool] = {}
        self._local: dict[int, tuple[Model, int]] = {}  # by id(model): a local copy for inference
        self._version: dict[int, int] = {}
        self._per_shard = _per_shard_step(self.mesh)

    def _replicated(self, model: Model, tree):
        sharding = NamedSharding(self.mesh, P())

        def replicate(leaf) -> jax.Array:
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        with _x64(model):
            return jax.tree_util.tree_map(replicate, tree)

    def _sharded(self, model: Model, local: np.ndarray) -> jax.Array:
        with _x64(model):
            return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(AXIS)), local)

    def build(self, adapter: JaxAdapter, config: DenseNetConfig, seed=0, dtype="float32", sync_bn=False) -> Model:
        model = adapter.build(config, seed=seed, dtype=dtype)
        self._sync[id(model)] = sync_bn
        model.variables = self._replicated(model, model.variables)
        self._version[id(model)] = 0
        return model

    def set_weights(self, adapter, model, weights):
        adapter.set_weights(model, weights)
        model.variables = self._replicated(model, model.variables)
        self._version[id(model)] += 1

    def get_weights(self, adapter, model):
        return adapter.get_weights(model)  # replicated arrays: every process reads its own copy

    @collective
    def train_step(self, adapter, model, X, y, lr):
        X = np.ascontiguousarray(to_layout(np.asarray(X, model.dtype), "NHWC"))
        y = adapter.check_labels(X, y, model.config.num_classes).astype(np.int32)
        sync = self._sync[id(model)]
        shard = len(y) * self.world // self.replicas  # images per device
        counted = len(y) * self.world if sync else shard  # what each BatchNorm averages over
        unbias = adapter._unbias_tree(model, (counted, X.shape[3], X.shape[1], X.shape[2]))
        key = self._replicated(model, np.asarray(adapter._dropout_key(model)))
        step = _global_step if sync else self._per_shard
        net = model.net.clone(training=True)
        v = model.variables
        opt_state = self._opt_state(model)
        with _x64(model):
            X, y = self._sharded(model, X), self._sharded(model, y)
            loss, params, batch_stats, opt_state, logits = step(
                net, model.sgd, v["params"], v["batch_stats"], opt_state, X, y, lr, key, unbias
            )
        model.variables = {"params": params, "batch_stats": batch_stats}
        model.runtime.opt_state = opt_state
        self._version[id(model)] += 1
        shards = sorted(logits.addressable_shards, key=lambda s: s.index[0].start or 0)
        return float(loss), np.concatenate([np.asarray(s.data) for s in shards])

    def _opt_state(self, model: Model):
        """``model.runtime.opt_state`` replicated over the mesh: made here (zero velocities) after
        ``configure_optimizer``, placed again after ``set_optimizer_state`` wrote local arrays."""
        state = model.runtime.opt_state
        if state is None:
            with _x64(model):  # velocities in the parameters' dtype
                host = jax.tree_util.tree_map(np.asarray, model.variables["params"])
                state = make_optimizer(model.sgd, 0.0).init(host)
        replicated = NamedSharding(self.mesh, P())
        leaves = jax.tree_util.tree_leaves(state)
        if not all(isinstance(a, jax.Array) and a.sharding.is_equivalent_to(replicated, a.ndim) for a in leaves):
            state = self._replicated(model, state)
        model.runtime.opt_state = state
        return state

    def get_optimizer_state(self, adapter, model):
        self._opt_state(model)  # not the adapter's: its zeros would not be on the mesh
        return adapter.get_optimizer_state(model)  # replicated arrays: every process reads its own copy

    def set_optimizer_state(self, adapter, model, state):
        self._opt_state(model)
        adapter.set_optimizer_state(model, state)
        self._opt_state(model)

    def forward(self, adapter, model, X):
        local, version = self._local.get(id(model), (None, -1))
        if local is None:
            local = Model(model.config, model.net, JaxRuntime(seed=model.runtime.seed), model.dtype)
        if version != self._version[id(model)]:
            with _x64(model):
                local.variables = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), model.variables)
            self._local[id(model)] = local, self._version[id(model)]
        return adapter.forward(local, X, compiled=True)

    @collective
    def sum(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.float64)
        if self.world == 1:
            return values
        with jax.experimental.enable_x64(True):
            return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)

    def close(self) -> None:
        if self.world > 1:
            jax.distributed.shutdown()

    def peer_gone(self, exc: Exception) -> str | None:
        # XLA's runtime errors: a gloo connection the peer closed, or the coordination service
        # reporting it missing (UNAVAILABLE, DEADLINE_EXCEEDED).
        message = str(exc)
        if isinstance(exc, RuntimeError) and re.search(_PEER, message, re.I):
            return telling_line(message, _PEER)
        return None


_PEER = r"gloo|connection (closed|reset)|by peer|UNAVAILABLE|DEADLINE_EXCEEDED|heartbeat"


def connect(timeout_s: float = 120.0) -> JaxGroup:
    """Join the group the DENSENET_JAX_* variables describe (one process without them)."""
    return JaxGroup(timeout_s)
