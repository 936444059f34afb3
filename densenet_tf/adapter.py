"""The harness's view of the TensorFlow/Keras DenseNet (see ``common.adapter``)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from common.adapter import Adapter, Model
from common.config import DenseNetConfig, min_input_size
from densenet_tf.model import DenseBlock, DenseNet, transition_block

_BN_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


class TFAdapter(Adapter):
    name = "tf"
    framework = "TensorFlow/Keras"
    layout = "NHWC"
    running_var_unbiased = False

    def version(self) -> str:
        return f"{tf.__version__} (Keras {tf.keras.__version__})"

    def build(self, config: DenseNetConfig, seed: int = 0) -> Model:
        tf.keras.utils.set_random_seed(seed)
        net = DenseNet(config.num_channels, config.growth_rate, config.arch, config.lr, config.num_classes)
        size = min_input_size(config)
        net(tf.zeros((1, size, size, config.in_channels)), training=False)  # build the layers
        return Model(config, net)

    def _to_native(self, X: np.ndarray) -> tf.Tensor:
        return tf.convert_to_tensor(X)

    def _to_numpy(self, Y: tf.Tensor) -> np.ndarray:
        return Y.numpy()

    def _forward(self, model: Model, X: tf.Tensor, training: bool, compiled: bool) -> tf.Tensor:
        if compiled:
            if "compiled" not in model.cache:
                model.cache["compiled"] = tf.function(lambda X, training: model.net(X, training=training))
            return model.cache["compiled"](X, training)
        return model.net(X, training=training)

    def _stages(self, model: Model, X: tf.Tensor, training: bool) -> list[tf.Tensor]:
        outs = []
        for stage in model.net.net.layers:
            X = stage(X, training=training)
            outs.append(X)
        return outs

    def _block(self, kind: str, num_convs: int, num_channels: int, X: tf.Tensor) -> tf.Tensor:
        blk = DenseBlock(num_convs, num_channels) if kind == "dense" else transition_block(num_channels)
        return blk(X, training=False)

    def _variables(self, model: Model) -> dict[str, tf.Variable]:
        """Canonical name -> the Keras variable (moving statistics included)."""
        out: dict[str, tf.Variable] = {}

        def conv(prefix: str, m) -> None:
            out[f"{prefix}.conv.weight"], out[f"{prefix}.conv.bias"] = m.kernel, m.bias

        def bn(prefix: str, m) -> None:
            for leaf, native in _BN_LEAVES.items():
                out[f"{prefix}.bn.{leaf}"] = getattr(m, native)

        stages = model.net.net.layers
        conv("stem", stages[0].layers[1])
        bn("stem", stages[0].layers[2])
        k = 1
        for i in range(len(model.config.arch)):
            for j, blk in enumerate(stages[k].net):
                bn(f"dense{i + 1}.conv{j + 1}", blk.bn)
                conv(f"dense{i + 1}.conv{j + 1}", blk.conv)
            k += 1
            if i != len(model.config.arch) - 1:
                bn(f"transition{i + 1}", stages[k].batch_norm)
                conv(f"transition{i + 1}", stages[k].conv)
                k += 1
        head = stages[k].layers
        bn("head", head[0])
        out["head.fc.weight"], out["head.fc.bias"] = head[4].kernel, head[4].bias
        return out

    def _read(self, model: Model) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self._variables(model).items()}

    def _write(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        for k, v in self._variables(model).items():
            v.assign(weights[k])

    def _loss_and_grads(self, model: Model, X: tf.Tensor, y: np.ndarray):
        y = self.check_labels(X, y, model.config.num_classes)
        variables = {k: v for k, v in self._variables(model).items() if v.trainable}
        with tf.GradientTape() as tape:
            tape.watch(X)
            logits = model.net(X, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        dX, *grads = tape.gradient(loss, [X, *variables.values()])
        return loss, dX, dict(zip(variables, grads)), variables

    def loss_and_grads(self, model, X, y):
        loss, dX, grads, _ = self._loss_and_grads(model, self.prepare(model, X), y)
        canonical = {k: self.canonical_param(k, g.numpy()) for k, g in grads.items()}
        return float(loss), self.canonical_activation(dX.numpy()), canonical

    def sgd_step(self, model, X, y, lr):
        opt = model.cache.get("sgd")
        if opt is None:
            opt = model.cache["sgd"] = tf.keras.optimizers.SGD(learning_rate=lr)
        opt.learning_rate.assign(lr)
        loss, _, grads, variables = self._loss_and_grads(model, self.prepare(model, X), y)
        opt.apply_gradients([(grads[k], variables[k]) for k in variables])
        return float(loss)
