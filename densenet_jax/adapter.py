"""The harness's view of the JAX/Flax DenseNet (see ``common.adapter``).

Flax modules hold no state: ``Model.variables`` carries ``params`` and ``batch_stats``, and
every "mutation" below replaces them with the new values a pure function returned.
``Model.runtime`` (:class:`JaxRuntime`) carries the dropout seed and what is jitted once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.core import unfreeze
from jax.experimental import enable_x64

from common.adapter import Adapter, Model, check_dtype, check_precision
from common.arch import min_input_size
from common.config import BN_MOMENTUM, DenseNetConfig
from common.errors import Unsupported
from common.training.optim import SGD
from densenet_jax.model import DenseBlock, DenseNet, transition_block
from densenet_jax.optim import make_optimizer, velocities, with_velocities

CACHE_ENV = "DENSENET_JAX_CACHE"


def compilation_cache_dir() -> Path | None:
    """Where XLA's compiled programs are kept between processes: ``$DENSENET_JAX_CACHE`` (a
    directory; ``off`` for none), else ``$XDG_CACHE_HOME/densenet-suite/jax`` (``~/.cache``).

    Compiling is most of a short JAX run (docs/performance.md#what-each-backend-runs-by-default-and-why),
    and every process compiled the very same programs again: tests, each ``densenet`` command, each
    distributed worker."""
    chosen = os.environ.get(CACHE_ENV, "")
    if chosen.lower() in ("off", "0", "none"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "densenet-suite" / "jax"


def _use_compilation_cache() -> None:
    if jax.config.jax_compilation_cache_dir:  # the user's own (JAX_COMPILATION_CACHE_DIR)
        return
    path = compilation_cache_dir()
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only home: compile every time, as JAX does by default
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))


_use_compilation_cache()

# --- BatchNorm's sums as matrix products ---------------------------------------------------------
#
# XLA:CPU reduces over the batch and spatial axes far more slowly than it multiplies by a row of
# ones (docs/performance.md#what-each-backend-runs-by-default-and-why), and a training step has
# dozens of such sums: BatchNorm's mean and variance, and in the backward pass the gradients of
# its scale and bias and the input's. The book's network stays the book's: Flax's
# ``nn.BatchNorm``, with its variables. In training, the adapter intercepts its call and computes
# the same function, with the same variables and the same two-pass variance, with every sum over
# the batch a matrix product, and a backward pass written out (``_bn_train``) so that its sums
# are products too.

_stats_as_products = True
"""Off only for the bench's ``flax-bn`` mode, which measures Flax's own BatchNorm."""


def _column_sums(Z: jax.Array) -> jax.Array:
    """(M, C) -> (C,): the sum of each column, as a (1, M) x (M, C) product."""
    return (jnp.ones((1, Z.shape[0]), Z.dtype) @ Z)[0]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn_train(X: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """Training-mode BatchNorm of (M, C) rows: ``(Y, mean, biased variance)``, as Flax computes
    them (two-pass variance; ``(X - mean) * (rsqrt(var + eps) * scale) + bias``)."""
    return _bn_train_fwd(X, scale, bias, eps)[0]


def _bn_train_fwd(X, scale, bias, eps):
    M = X.shape[0]
    mean = _column_sums(X) / M
    Xc = X - mean
    var = _column_sums(Xc * Xc) / M
    inv = jax.lax.rsqrt(var + eps)
    Y = Xc * (inv * scale) + bias
    return (Y, mean, var), (Xc, inv, scale)


def _bn_train_bwd(eps, residuals, cotangents):
    Xc, inv, scale = residuals
    dY, dmean, dvar = cotangents
    M = Xc.shape[0]
    Xhat = Xc * inv
    dbias = _column_sums(dY)
    dscale = _column_sums(dY * Xhat)
    # d/dX of the normalisation, plus the batch statistics' own outputs (what the running
    # statistics are made of; their cotangents are zero in a training step).
    dX = (scale * inv / M) * (M * dY - dbias - Xhat * dscale) + dmean / M + Xc * (2 * dvar / M)
    return dX, dscale, dbias


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def _batch_norm_as_products(next_fun, args, kwargs, context):
    """A ``nn.intercept_methods`` interceptor: Flax's training-mode BatchNorm over the last axis,
    computed by ``_bn_train``; every other call goes to Flax unchanged."""
    bn = context.module
    if not (isinstance(bn, nn.BatchNorm) and context.method_name == "__call__") or bn.is_initializing():
        return next_fun(*args, **kwargs)
    use_running_average = nn.merge_param(
        "use_running_average", bn.use_running_average, kwargs.get("use_running_average")
    )
    plain = bn.axis == -1 and bn.axis_name is None and bn.use_scale and bn.use_bias and not bn.use_fast_variance
    if use_running_average or not plain or len(args) != 1 or kwargs.get("mask") is not None:
        return next_fun(*args, **kwargs)
    X = args[0]
    C = X.shape[-1]
    scale = bn.param("scale", bn.scale_init, (C,), bn.param_dtype)
    bias = bn.param("bias", bn.bias_init, (C,), bn.param_dtype)
    ra_mean = bn.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (C,))
    ra_var = bn.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (C,))
    # At least float32, as Flax's own statistics: in mixed precision the bfloat16 input is
    # normalised in float32 and the result handed on in bfloat16.
    dtype = jnp.promote_types(jnp.result_type(X, scale), jnp.float32)
    Y, mean, var = _bn_train(X.reshape(-1, C).astype(dtype), scale.astype(dtype), bias.astype(dtype), bn.epsilon)
    ra_mean.value = bn.momentum * ra_mean.value + (1 - bn.momentum) * mean
    ra_var.value = bn.momentum * ra_var.value + (1 - bn.momentum) * var
    return Y.reshape(X.shape).astype(jnp.result_type(X, scale))


def _intercepted():
    """The BatchNorm interceptor's context (when on)."""
    return nn.intercept_methods(_batch_norm_as_products) if _stats_as_products else nullcontext()


def _training_apply(net: nn.Module, *args, **kwargs):
    """``net.apply`` with the BatchNorm interceptor (when on)."""
    with _intercepted():
        return net.apply(*args, **kwargs)


# canonical BN leaf -> (collection, Flax name)
_BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def compute_cast(tree, precision: str):
    """Mixed precision the way Flax layers with ``dtype=jnp.bfloat16, param_dtype=jnp.float32``
    compute: the float32 parameters (or an input) cast to bfloat16 on their way into the
    network, so convolutions and dense layers run in bfloat16 while gradients reach the float32
    master copies through the cast; BatchNorm statistics stay float32 (``batch_stats`` is never
    cast, and the normalisation promotes to float32). Identity in float32 and float64."""
    if precision != "bfloat16":
        return tree
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, tree)


def _loss(net: DenseNet, params, batch_stats, X, y, key, unbias, precision: str = "float32"):
    logits, updates = _training_apply(
        net,
        {"params": compute_cast(params, precision), "batch_stats": batch_stats},
        compute_cast(X, precision),
        mutable=["batch_stats"],
        rngs={"dropout": key},
    )
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # the loss in float32 at least
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    # Flax feeds the running variance the biased batch variance; re-express the update in the
    # canonical (PyTorch) convention. ``unbias`` holds 1/(n-1) at each variance, 0 at each mean
    # (JaxAdapter.canonical_running_stat with factor n/(n-1), written for the pytree).
    new_stats = jax.tree_util.tree_map(
        lambda new, old, c: new + (new - (1 - BN_MOMENTUM) * old) * c, updates["batch_stats"], batch_stats, unbias
    )
    return loss, (new_stats, logits)


def loss_value_and_grad(net: DenseNet, params, batch_stats, X, y, key, unbias, precision="float32", argnums=1):
    """``jax.value_and_grad(_loss, argnums, has_aux=True)`` with the BatchNorm interceptor on for
    the backward pass as well: the memory-efficient network recomputes BatchNorms there."""
    with _intercepted():
        return jax.value_and_grad(_loss, argnums=argnums, has_aux=True)(
            net, params, batch_stats, X, y, key, unbias, precision
        )


@partial(jax.jit, static_argnums=(0, 7))
def _loss_and_grads(net: DenseNet, params, batch_stats, X, y, key, unbias, precision: str):
    (loss, (batch_stats, _)), (dparams, dX) = loss_value_and_grad(
        net, params, batch_stats, X, y, key, unbias, precision, argnums=(1, 3)
    )
    return loss, batch_stats, dparams, dX


@partial(jax.jit, static_argnums=(0, 5, 10))
def _sgd_step(net: DenseNet, params, batch_stats, X, y, sgd: SGD, lr, opt_state, key, unbias, precision: str):
    (loss, (batch_stats, logits)), grads = loss_value_and_grad(net, params, batch_stats, X, y, key, unbias, precision)
    updates, opt_state = make_optimizer(sgd, lr).update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), batch_stats, opt_state, logits


# Flax variable collections, or a tree shaped like one of them: nested dicts with arrays
# (or numbers) at the leaves.
Tree = dict[str, Any]
# ``apply(variables, X, dropout_key) -> (logits or stage outputs, mutated collections)``
Apply = Callable[[Tree, jax.Array, jax.Array], tuple[Any, Tree]]


@dataclass
class JaxRuntime:
    """What the JAX adapter keeps beside a network: Flax modules are stateless, so the dropout
    key stream lives here, with the jitted callables and constants made once per model."""

    seed: int
    """The build seed; every training call folds the next ``dropout_step`` into it."""
    dropout_step: int = -1
    """Index of the last dropout key handed out (-1: none yet)."""
    jitted: dict[tuple[bool, bool], Apply] = field(default_factory=dict)
    """``jax.jit``-ed apply functions by ``(training, stages)``, made on first use."""
    unbias: dict[tuple[int, ...], Tree] = field(default_factory=dict)
    """Per NCHW batch shape, the ``batch_stats``-shaped tree of running-variance corrections
    (``JaxAdapter._unbias_tree``)."""
    opt_state: Any = None
    """The optax state of ``Model.sgd`` (``densenet_jax.optim.make_optimizer``), made on first use."""


JaxModel = Model[JaxRuntime]


def _x64(model: JaxModel):
    """JAX computes in float64 only where x64 is enabled: around every call on a float64 model."""
    return enable_x64(model.dtype == "float64")


class JaxAdapter(Adapter[JaxRuntime]):
    name = "jax"
    export_module = "densenet_jax.export"
    framework = "JAX/Flax"
    layout = "NHWC"
    running_var_unbiased = False
    # "flax-bn": jit with Flax's own BatchNorm sums instead of the adapter's products.
    bench_modes = ("eager", "jit", "flax-bn")

    def version(self) -> str:
        import flax

        return f"{jax.__version__} (Flax {flax.__version__})"

    def build(
        self,
        config: DenseNetConfig,
        seed: int = 0,
        dtype: str = "float32",
        *,
        memory_efficient: bool = False,
        precision: str = "float32",
    ) -> JaxModel:
        dtype = check_dtype(dtype)
        precision = check_precision(precision, dtype)
        net = DenseNet.for_config(config, memory_efficient=memory_efficient)
        size = min_input_size(config)
        # jit makes initialisation one compiled call instead of hundreds of eager ops.
        variables = jax.jit(net.init)(
            jax.random.PRNGKey(seed), jnp.zeros((1, size, size, config.in_channels), jnp.float32)
        )
        model = Model(
            config, net, JaxRuntime(seed=seed), dtype=dtype, precision=precision, variables=unfreeze(variables)
        )
        if dtype == "float64":
            # Flax's modules compute in the dtype their inputs and parameters promote to.
            with _x64(model):
                model.variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.variables)
        return model

    def _to_native(self, X: np.ndarray) -> jnp.ndarray:
        with enable_x64(X.dtype == np.float64):
            return jnp.asarray(X)

    def _to_numpy(self, Y: jnp.ndarray) -> np.ndarray:
        return np.asarray(Y.astype(jnp.float32) if Y.dtype == jnp.bfloat16 else Y)  # numpy has no bfloat16

    @staticmethod
    def _dropout_key(model: JaxModel) -> jax.Array:
        """A fresh, seeded key for dropout on every training call (ignored without dropout)."""
        model.runtime.dropout_step += 1
        return jax.random.fold_in(jax.random.PRNGKey(model.runtime.seed), model.runtime.dropout_step)

    def _apply(self, model: JaxModel, X: jnp.ndarray, training: bool, compiled: bool, stages: bool = False):
        net = model.net.clone(training=training)
        mutable = (["batch_stats"] if training else []) + (["intermediates"] if stages else [])

        precision = model.precision

        def apply(variables, X, key):
            variables = {**variables, "params": compute_cast(variables["params"], precision)}
            X = compute_cast(X, precision)
            if not mutable:
                return net.apply(variables, X), {}
            return _training_apply(net, variables, X, mutable=mutable, rngs={"dropout": key})

        if compiled:
            if (training, stages) not in model.runtime.jitted:
                model.runtime.jitted[training, stages] = jax.jit(apply)
            apply = model.runtime.jitted[training, stages]
        with _x64(model):
            return apply(model.variables, X, self._dropout_key(model))

    def forward(self, model: JaxModel, X: np.ndarray, *, training: bool = False, compiled: bool = True) -> np.ndarray:
        """Logits ``(N, num_classes)``; jitted unless ``compiled=False`` (op-by-op Flax dispatches
        hundreds of small operations one by one; docs/performance.md has what that costs)."""
        return super().forward(model, X, training=training, compiled=compiled)

    def bench_step(self, model, phase, mode, X, y, lr=0.01):
        if phase == "train" and mode == "eager":
            raise Unsupported("JAX's training step is always jitted here (op-by-op Flax would take minutes a step)")
        if mode == "flax-bn":
            # The bench runs each case in a fresh process, before anything is traced.
            global _stats_as_products
            _stats_as_products = False
        return super().bench_step(model, phase, mode, X, y, lr)

    def _forward(self, model: JaxModel, X, training: bool, compiled: bool):
        return self._apply(model, X, training, compiled)[0]

    def _stages(self, model: JaxModel, X, training: bool) -> list:
        # Eager Flax dispatches hundreds of small ops one by one (seconds); jit runs one program.
        _, state = self._apply(model, X, training, compiled=True, stages=True)
        return list(state["intermediates"]["stages"])

    def _block(self, kind: str, X: jax.Array, num_channels: int, *, num_convs: int) -> jax.Array:
        blk = (
            DenseBlock(num_convs, num_channels, training=False)
            if kind == "dense"
            else transition_block(num_channels, training=False)
        )
        variables = blk.init(jax.random.PRNGKey(0), X)
        return blk.apply(variables, X)

    def _layers(self, model: JaxModel) -> list[tuple[str, tuple[str, ...]]]:
        """Paths of the conv, BatchNorm and dense layers in ``params``, in forward order.

        jax.jit returns dicts with sorted keys ("net_10" before "net_2", "Conv_0" before
        "BatchNorm_1"), so the order is rebuilt from Flax's names: by the number after the last
        underscore, a BatchNorm before the conv of the same number (the conv block's order).
        """

        def order(key: str) -> tuple[int, int]:
            kind, _, number = key.rpartition("_")
            return int(number) if number.isdigit() else 0, 0 if kind == "BatchNorm" else 1

        out: list[tuple[str, tuple[str, ...]]] = []

        def walk(tree, path: tuple[str, ...]) -> None:
            if "kernel" in tree:
                out.append(("conv" if tree["kernel"].ndim == 4 else "fc", path))
            elif "scale" in tree:
                out.append(("bn", path))
            else:
                for key in sorted(tree, key=order):
                    walk(tree[key], (*path, key))

        walk(model.variables["params"], ())
        return out

    def _layer_tensors(self, kind: str, layer: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """Canonical leaf -> path of the array in ``Model.variables``."""
        if kind == "bn":
            return {leaf: (collection, *layer, native) for leaf, (collection, native) in _BN_LEAVES.items()}
        return {"weight": ("params", *layer, "kernel"), "bias": ("params", *layer, "bias")}

    def _tensors(self, model: JaxModel) -> dict[str, tuple[str, ...]]:
        # Networks without conv biases have no "bias" entry under their conv layers.
        return {k: p for k, p in super()._tensors(model).items() if self._has(model.variables, p)}

    @staticmethod
    def _has(tree, path: tuple[str, ...]) -> bool:
        for key in path:
            if key not in tree:
                return False
            tree = tree[key]
        return True

    @staticmethod
    def _get(tree, path: tuple[str, ...]):
        for key in path:
            tree = tree[key]
        return tree

    def _read(self, model: JaxModel) -> dict[str, np.ndarray]:
        return {k: np.array(self._get(model.variables, p)) for k, p in self._tensors(model).items()}

    def _write(self, model: JaxModel, weights: dict[str, np.ndarray]) -> None:
        variables = jax.tree_util.tree_map(lambda a: a, model.variables)  # new containers
        with _x64(model):
            for k, path in self._tensors(model).items():
                parent = self._get(variables, path[:-1])
                parent[path[-1]] = jnp.asarray(weights[k])
        model.variables = variables

    def _unbias_tree(self, model: JaxModel, X_shape: tuple[int, ...]) -> Tree:
        """``batch_stats``-shaped tree: 1/(n-1) at every running variance, 0 at every mean."""
        key = tuple(X_shape)
        if key not in model.runtime.unbias:
            tree = jax.tree_util.tree_map(lambda a: 0.0, model.variables["batch_stats"])
            paths = self._tensors(model)
            for name, factor in self.running_stat_factors(model, X_shape).items():
                parent = self._get(tree, paths[name][1:-1])
                parent[paths[name][-1]] = factor - 1
            model.runtime.unbias[key] = tree
        return model.runtime.unbias[key]

    def _grad_tree_to_canonical(self, model: JaxModel, grads) -> dict[str, np.ndarray]:
        return {
            k: self.canonical_param(k, np.asarray(self._get(grads, p[1:])))
            for k, p in self._tensors(model).items()
            if p[0] == "params"
        }

    def _training_call(self, model: JaxModel, X: np.ndarray, y: np.ndarray, step, *args):
        """``step(net, params, batch_stats, X, y, *args, dropout key, unbias tree)`` on checked
        inputs, in the model's precision (the jitted functions at the top of this module)."""
        X = self.prepare(model, X)
        nchw = (X.shape[0], X.shape[3], X.shape[1], X.shape[2])
        with _x64(model):
            y = jnp.asarray(self.check_labels(X, y, model.config.num_classes))
            v = model.variables
            net = model.net.clone(training=True)
            return step(
                net,
                v["params"],
                v["batch_stats"],
                X,
                y,
                *args,
                self._dropout_key(model),
                self._unbias_tree(model, nchw),
                model.precision,
            )

    def loss_and_grads(self, model, X, y):
        v = model.variables
        loss, batch_stats, dparams, dX = self._training_call(model, X, y, _loss_and_grads)
        model.variables = {"params": v["params"], "batch_stats": batch_stats}
        return float(loss), self.canonical_activation(np.asarray(dX)), self._grad_tree_to_canonical(model, dparams)

    def _opt_state(self, model: JaxModel):
        if model.runtime.opt_state is None:
            with _x64(model):  # velocities in the parameters' dtype
                model.runtime.opt_state = make_optimizer(model.sgd, 0.0).init(model.variables["params"])
        return model.runtime.opt_state

    def _reset_optimizer(self, model: JaxModel) -> None:
        model.runtime.opt_state = None

    def _read_velocities(self, model: JaxModel) -> dict[str, np.ndarray]:
        trace = velocities(self._opt_state(model))
        if trace is None:
            return {}
        return {k: np.array(self._get(trace, p[1:])) for k, p in self._tensors(model).items() if p[0] == "params"}

    def _write_velocities(self, model: JaxModel, values: dict[str, np.ndarray]) -> None:
        state = self._opt_state(model)
        trace = jax.tree_util.tree_map(lambda a: a, velocities(state))  # new containers
        with _x64(model):
            for k, path in self._tensors(model).items():
                if path[0] == "params":
                    self._get(trace, path[1:-1])[path[-1]] = jnp.asarray(values[k])
        model.runtime.opt_state = with_velocities(state, trace)

    def train_step(self, model, X, y, lr, compiled=False):  # always jitted: eager Flax takes minutes
        loss, params, batch_stats, opt_state, logits = self._training_call(
            model, X, y, _sgd_step, model.sgd, lr, self._opt_state(model)
        )
        model.variables = {"params": params, "batch_stats": batch_stats}
        model.runtime.opt_state = opt_state
        return float(loss), np.asarray(logits)
