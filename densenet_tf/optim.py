"""The suite's SGD (``common.training.optim.SGD``, PyTorch's definition) as a Keras optimizer.

Keras's ``SGD`` folds the learning rate into the velocity (``v = momentum * v - lr * g``), which
is another update as soon as the rate changes, and Keras 3's ``weight_decay`` is decoupled
(``w -= lr * weight_decay * w``, outside the velocity). ``SuiteSGD`` keeps Keras's SGD
(its ``momentums`` variables, ``apply_gradients``, ``tf.function``) and overrides ``update_step``.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from common.training.optim import DECOUPLED_WEIGHT_DECAY, FOLDED_LR, SGD, Convention

__all__ = ["STOCK", "SuiteSGD", "apply_steps", "make_optimizer", "stock_convention"]

# What this framework offers for the same words (``apply_steps(..., stock=True)``).
STOCK = "keras.optimizers.SGD with weight_decay"


class SuiteSGD(keras.optimizers.SGD):
    """``keras.optimizers.SGD`` computing ``common.training.optim.SGD``: the velocity holds gradients,
    ``coupled_weight_decay * w`` added to them, and the rate only scales the step."""

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, coupled_weight_decay=0.0, **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, momentum=float(momentum), nesterov=nesterov, **kwargs)
        self.coupled_weight_decay = float(coupled_weight_decay)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            decay = ops.convert_to_tensor(self.coupled_weight_decay, dtype=variable.dtype)
            g = ops.add(g, ops.multiply(decay, variable))
        if self.momentum != 0:
            momentum = ops.convert_to_tensor(self.momentum, dtype=variable.dtype)  # ops.cast goes through float32
            b = ops.add(ops.multiply(self.momentums[self._get_variable_index(variable)], momentum), g)
            self.assign(self.momentums[self._get_variable_index(variable)], b)
            g = ops.add(g, ops.multiply(b, momentum)) if self.nesterov else b
        self.assign_sub(variable, ops.multiply(g, lr))

    def get_config(self):
        return {**super().get_config(), "coupled_weight_decay": self.coupled_weight_decay}


def make_optimizer(sgd: SGD, dtype: str = "float32") -> SuiteSGD:
    """``SuiteSGD`` for ``sgd``, its learning-rate variable in ``dtype`` (float32 would round the
    rate of a float64 model: 0.01 -> 0.0099999998)."""
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        return SuiteSGD(momentum=sgd.momentum, nesterov=sgd.nesterov, coupled_weight_decay=sgd.weight_decay)
    finally:
        keras.config.set_floatx(previous)


def stock_convention(sgd: SGD) -> Convention:
    """How ``keras.optimizers.SGD(momentum=, nesterov=, weight_decay=)`` reads ``sgd``."""
    return DECOUPLED_WEIGHT_DECAY if sgd.weight_decay else FOLDED_LR


def apply_steps(w0: np.ndarray, grads: list[np.ndarray], lrs: list[float], sgd: SGD, stock: bool = False) -> np.ndarray:
    """``w0`` after one step per gradient at the given rates, by ``SuiteSGD`` or (``stock``)
    Keras's own ``SGD`` given the same words."""
    dtype = w0.dtype.name
    opt = make_optimizer(sgd, dtype)
    if stock:
        previous = keras.config.floatx()
        keras.config.set_floatx(dtype)
        try:
            opt = keras.optimizers.SGD(
                momentum=sgd.momentum, nesterov=sgd.nesterov, weight_decay=sgd.weight_decay or None
            )
        finally:
            keras.config.set_floatx(previous)
    w = keras.Variable(w0, dtype=dtype)
    for g, lr in zip(grads, lrs):
        opt.learning_rate.assign(lr)
        opt.apply_gradients([(keras.ops.convert_to_tensor(np.asarray(g, dtype)), w)])
    return np.asarray(w.numpy())
