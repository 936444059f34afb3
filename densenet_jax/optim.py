"""The suite's SGD (``common.training.optim.SGD``, PyTorch's definition) as an optax chain.

``optax.sgd`` keeps the velocity as PyTorch does (``optax.trace``: ``t = g + momentum * t``,
Nesterov ``g + momentum * t``) and scales by the rate after; the coupled weight decay is
``optax.add_decayed_weights`` in front of it (``g + weight_decay * w``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import enable_x64

from common.training.optim import SGD, Convention

__all__ = ["STOCK", "apply_steps", "make_optimizer", "stock_convention", "velocities", "with_velocities"]

# What this framework offers for the same words (``apply_steps(..., stock=True)``).
STOCK = "optax.add_decayed_weights + optax.sgd, the definition"


def make_optimizer(sgd: SGD, lr) -> optax.GradientTransformation:
    """The chain for ``sgd`` at rate ``lr`` (a traced scalar inside ``jax.jit``: the state's
    structure does not depend on it, so one state serves every rate)."""
    decay = optax.add_decayed_weights(sgd.weight_decay) if sgd.weight_decay else optax.identity()
    return optax.chain(decay, optax.sgd(lr, momentum=sgd.momentum or None, nesterov=sgd.nesterov))


def velocities(opt_state):
    """The velocity tree inside a state of :func:`make_optimizer` (shaped like the parameters),
    or None without momentum."""
    return optax.tree_utils.tree_get(opt_state, "trace") if _has_trace(opt_state) else None


def with_velocities(opt_state, trace):
    """``opt_state`` with its velocity tree replaced."""
    return optax.tree_utils.tree_set(opt_state, trace=trace)


def _has_trace(opt_state) -> bool:
    return any(isinstance(s, optax.TraceState) for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_trace))


def _is_trace(x) -> bool:
    return isinstance(x, optax.TraceState)


def stock_convention(sgd: SGD) -> Convention:
    """optax's stock chain is the definition."""
    return Convention()


def apply_steps(w0: np.ndarray, grads: list[np.ndarray], lrs: list[float], sgd: SGD, stock: bool = False) -> np.ndarray:
    """``w0`` after one step per gradient at the given rates (``stock`` changes nothing here)."""
    with enable_x64(w0.dtype == np.float64):
        w = jnp.asarray(w0)
        state = make_optimizer(sgd, 0.0).init(w)
        for g, lr in zip(grads, lrs):
            updates, state = make_optimizer(sgd, lr).update(jnp.asarray(g, w0.dtype), state, w)
            w = optax.apply_updates(w, updates)
        return np.asarray(w)
