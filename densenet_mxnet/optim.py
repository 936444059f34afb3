"""The suite's SGD (``common.training.optim.SGD``, PyTorch's definition) as an MXNet optimizer.

MXNet's own ``sgd`` folds the learning rate into the velocity (``mom = momentum * mom - lr * g;
w += mom``), which is another update as soon as the rate changes; its ``nag`` keeps the velocity
as PyTorch does. ``SuiteSGD`` is registered with ``mx.optimizer`` and computes the suite's update
with NDArray arithmetic, whose scalars stay float64 (the fused ``sgd_update`` ops take the rate
as a float32 parameter, 0.01 -> 0.0099999998).
"""

from __future__ import annotations

import numpy as np

from common.training.optim import FOLDED_LR, SGD, Convention
from densenet_mxnet._compat import mxnet as mx

__all__ = ["STOCK", "SuiteSGD", "apply_steps", "make_optimizer", "stock_convention"]

# What this framework offers for the same words (``apply_steps(..., stock=True)``).
STOCK = "mx.optimizer.SGD or NAG"


@mx.optimizer.register
class SuiteSGD(mx.optimizer.Optimizer):
    """``mx.optimizer.create("suitesgd", momentum=..., nesterov=..., wd=...)``: the velocity
    holds gradients (with the weight decay ``wd * w`` added), the learning rate only scales the step."""

    def __init__(self, momentum: float = 0.0, nesterov: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.momentum, self.nesterov = momentum, nesterov

    def create_state(self, index, weight):
        if self.momentum == 0:
            return None
        return mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

    def update(self, index, weight, grad, state) -> None:
        self._update_count(index)
        lr, wd = self._get_lr(index), self._get_wd(index)
        g = grad * self.rescale_grad if self.rescale_grad != 1 else grad
        if wd:
            g = g + wd * weight
        if state is not None:
            state[:] = self.momentum * state + g
            g = g + self.momentum * state if self.nesterov else state
        weight[:] = weight - lr * g


def make_optimizer(sgd: SGD) -> SuiteSGD:
    """``SuiteSGD`` for ``sgd`` (for a ``gluon.Trainer``; the rate is set before every step)."""
    return SuiteSGD(momentum=sgd.momentum, nesterov=sgd.nesterov, wd=sgd.weight_decay)


def stock_convention(sgd: SGD) -> Convention:
    """How MXNet's stock optimizer for ``sgd`` (``sgd``, or ``nag`` for Nesterov) reads it: the
    learning rate folded into the velocity, the weight decay coupled."""
    return FOLDED_LR


def _stock(sgd: SGD) -> mx.optimizer.Optimizer:
    if sgd.nesterov:
        return mx.optimizer.NAG(momentum=sgd.momentum, wd=sgd.weight_decay)
    return mx.optimizer.SGD(momentum=sgd.momentum, wd=sgd.weight_decay)


def apply_steps(w0: np.ndarray, grads: list[np.ndarray], lrs: list[float], sgd: SGD, stock: bool = False) -> np.ndarray:
    """``w0`` after one step per gradient at the given rates, by ``SuiteSGD`` or (``stock``)
    MXNet's own optimizer for the same words (in ``w0``'s dtype; the stock ops round the rate
    to float32)."""
    opt = _stock(sgd) if stock else make_optimizer(sgd)
    updater = mx.optimizer.get_updater(opt)
    w = mx.nd.array(w0, dtype=w0.dtype)
    for g, lr in zip(grads, lrs):
        opt.set_learning_rate(lr)
        updater(0, mx.nd.array(g, dtype=w0.dtype), w)
    return w.asnumpy()
