"""The harness's view of the TensorFlow/Keras DenseNet (see ``common.adapter``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from common.adapter import Adapter, Model, check_dtype, check_precision
from common.arch import min_input_size
from common.config import DenseNetConfig
from common.process import threads
from densenet_tf.model import DenseBlock, DenseNet, TransitionBlock, transition_block
from densenet_tf.optim import SuiteSGD, make_optimizer

# `--threads N` (common.process.threads): TF_NUM_INTRAOP_THREADS and TF_NUM_INTEROP_THREADS size the
# pools; set through the API as well so that tf.config.threading reports the count (it says 0,
# "the default", for what came from the environment). Refused once TensorFlow has started its
# runtime, in a process that used it before loading the adapter: the variables hold then.
if (_threads := threads.requested()) is not None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(_threads)
        tf.config.threading.set_inter_op_parallelism_threads(_threads)
    except RuntimeError:
        pass

_BN_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _logits(net: tf.keras.Model, X: tf.Tensor, training: bool) -> tf.Tensor:
    """The network's logits, in float32 where the mixed policy made them bfloat16: the softmax and
    the loss should not run in bfloat16 (Keras's own advice for mixed precision)."""
    Y = net(X, training=training)
    return tf.cast(Y, tf.float32) if Y.dtype == tf.bfloat16 else Y


@dataclass
class TFRuntime:
    """What the TensorFlow adapter keeps beside a network; all made on first use."""

    compiled: Callable[[tf.Tensor, bool], tf.Tensor] | None = None
    """``tf.function`` of the forward pass ``(X, training) -> logits``."""
    sgd: SuiteSGD | None = None
    """The optimizer ``train_step`` steps, for ``Model.sgd``: a ``keras.optimizers.SGD`` computing
    the suite's update (``densenet_tf.optim``), its learning rate a variable in the model's dtype
    (assigned on every call), built on the trainable variables in canonical order."""
    train_step: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None
    """``tf.function`` of one step ``(X, y) -> (loss, logits)``, for ``train_step(..., compiled=True)``."""
    jit_compile: bool = False
    """Whether those ``tf.function`` compile with XLA (``jit_compile=True``); set before first use."""


TFModel = Model[TFRuntime]


class TFAdapter(Adapter[TFRuntime]):
    name = "tf"
    export_module = "densenet_tf.export"
    framework = "TensorFlow/Keras"
    layout = "NHWC"
    running_var_unbiased = False
    bench_modes = ("eager", "function", "xla")

    def version(self) -> str:
        return f"{tf.__version__} (Keras {tf.keras.__version__})"

    def build(
        self,
        config: DenseNetConfig,
        seed: int = 0,
        dtype: str = "float32",
        *,
        memory_efficient: bool = False,
        precision: str = "float32",
    ) -> TFModel:
        dtype = check_dtype(dtype)
        precision = check_precision(precision, dtype)
        tf.keras.utils.set_random_seed(seed)
        # Keras layers take their variable and compute dtype from the global dtype policy when
        # they are created: set it for this network only. Keras's mixed precision is such a
        # policy: "mixed_bfloat16" keeps float32 variables and computes in bfloat16, except in
        # BatchNormalization, which casts its input to float32 and normalises there.
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else dtype)
        try:
            net = DenseNet.for_config(config, memory_efficient=memory_efficient)
            size = min_input_size(config)
            net(tf.zeros((1, size, size, config.in_channels), dtype), training=False)  # build the layers
        finally:
            keras.config.set_dtype_policy(previous)
        return Model(config, net, TFRuntime(), dtype=dtype, precision=precision)

    def _to_native(self, X: np.ndarray) -> tf.Tensor:
        return tf.convert_to_tensor(X)

    def _to_numpy(self, Y: tf.Tensor) -> np.ndarray:
        return tf.cast(Y, tf.float32).numpy() if Y.dtype == tf.bfloat16 else Y.numpy()  # numpy has no bfloat16

    def _forward(self, model: TFModel, X: tf.Tensor, training: bool, compiled: bool) -> tf.Tensor:
        if compiled:
            if model.runtime.compiled is None:
                model.runtime.compiled = tf.function(
                    lambda X, training: _logits(model.net, X, training), jit_compile=model.runtime.jit_compile
                )
            return model.runtime.compiled(X, training)
        return _logits(model.net, X, training)

    def _stages(self, model: TFModel, X: tf.Tensor, training: bool) -> list[tf.Tensor]:
        outs = []
        for stage in model.net.net.layers:
            X = stage(X, training=training)
            outs.append(X)
        return outs

    def _block(self, kind: str, X: tf.Tensor, num_channels: int, *, num_convs: int) -> tf.Tensor:
        blk = DenseBlock(num_convs, num_channels) if kind == "dense" else transition_block(num_channels)
        return blk(X, training=False)

    def _layers(self, model: TFModel) -> list[tuple[str, tf.keras.layers.Layer]]:
        layers = tf.keras.layers
        kinds = ((layers.Conv2D, "conv"), (layers.BatchNormalization, "bn"), (layers.Dense, "fc"))
        out = []

        def walk(layer: layers.Layer) -> None:
            kind = next((k for cls, k in kinds if isinstance(layer, cls)), None)
            if kind:
                out.append((kind, layer))
                return
            # Sequential keeps its layers in .layers; our blocks keep theirs, in call order, in .net.
            for sub in layer.layers if isinstance(layer, tf.keras.Sequential) else getattr(layer, "net", []):
                walk(sub)

        walk(model.net.net)
        return out

    def _layer_tensors(self, kind: str, layer: tf.keras.layers.Layer) -> dict[str, tf.Variable]:
        if kind == "bn":
            return {leaf: getattr(layer, native) for leaf, native in _BN_LEAVES.items()}
        return {"weight": layer.kernel} | ({"bias": layer.bias} if layer.bias is not None else {})

    def _read(self, model: TFModel) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self._tensors(model).items()}

    def _write(self, model: TFModel, weights: dict[str, np.ndarray]) -> None:
        for k, v in self._tensors(model).items():
            v.assign(weights[k])

    def _loss_and_grads(self, model: TFModel, X: tf.Tensor, y):
        tensors = self._tensors(model)
        variables = {k: v for k, v in tensors.items() if v.trainable}
        factors = self.running_stat_factors(model, (X.shape[0], X.shape[3], X.shape[1], X.shape[2]))
        old = {k: tf.identity(tensors[k]) for k in factors}
        with tf.GradientTape() as tape:
            tape.watch(X)
            logits = _logits(model.net, X, True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        dX, *grads = tape.gradient(loss, [X, *variables.values()])
        # Keras feeds the moving variance the biased batch variance; the canonical is unbiased.
        for k, factor in factors.items():
            tensors[k].assign(self.canonical_running_stat(old[k], tensors[k], factor))
        return loss, dX, dict(zip(variables, grads)), variables, logits

    def loss_and_grads(self, model, X, y):
        X = self.prepare(model, X)
        y = self.check_labels(X, y, model.config.num_classes)
        loss, dX, grads, _, _ = self._loss_and_grads(model, X, y)
        canonical = {k: self.canonical_param(k, g.numpy()) for k, g in grads.items()}
        return float(loss), self.canonical_activation(dX.numpy()), canonical

    def _optimizer(self, model: TFModel) -> SuiteSGD:
        if model.runtime.sgd is None:
            opt = make_optimizer(model.sgd, model.dtype)
            opt.build([v for v in self._tensors(model).values() if v.trainable])  # the velocities, now
            model.runtime.sgd = opt
        return model.runtime.sgd

    def _reset_optimizer(self, model: TFModel) -> None:
        model.runtime.sgd = None
        model.runtime.train_step = None  # a traced step holds the old optimizer's variables

    def _velocity_variables(self, model: TFModel) -> dict[str, tf.Variable]:
        opt = self._optimizer(model)
        if not opt.momentums:
            return {}
        return {k: opt.momentums[opt._get_variable_index(v)] for k, v in self._tensors(model).items() if v.trainable}

    def _read_velocities(self, model: TFModel) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self._velocity_variables(model).items()}

    def _write_velocities(self, model: TFModel, velocities: dict[str, np.ndarray]) -> None:
        for k, v in self._velocity_variables(model).items():
            v.assign(velocities[k])

    def bench_step(self, model, phase, mode, X, y, lr=0.01):
        if mode == "xla":
            model.runtime.jit_compile = True
        return super().bench_step(model, phase, "eager" if mode == "eager" else "function", X, y, lr)

    def train_step(self, model, X, y, lr, compiled=False):
        opt = self._optimizer(model)
        opt.learning_rate.assign(lr)
        X = self.prepare(model, X)
        y = self.check_labels(X, y, model.config.num_classes)
        if compiled:
            if model.runtime.train_step is None:
                model.runtime.train_step = tf.function(
                    lambda X, y: self._step(model, X, y), jit_compile=model.runtime.jit_compile
                )
            step = model.runtime.train_step
        else:

            def step(X, y):
                return self._step(model, X, y)

        loss, logits = step(X, tf.convert_to_tensor(y))
        return float(loss), logits.numpy()

    def _step(self, model: TFModel, X: tf.Tensor, y: tf.Tensor):
        loss, _, grads, variables, logits = self._loss_and_grads(model, X, y)
        model.runtime.sgd.apply_gradients([(grads[k], variables[k]) for k in variables])
        return loss, logits

    def use_max_pool_in_transitions(self, model: TFModel) -> int:
        # A pool holds no weights: the layer is replaced in place, canonical weights unchanged.
        blocks = [layer for layer in model.net.net.layers if isinstance(layer, TransitionBlock)]
        for blk in blocks:
            blk.net[-1] = tf.keras.layers.MaxPool2D(pool_size=2, strides=2)
        return len(blocks)
