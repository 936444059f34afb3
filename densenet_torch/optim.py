"""The suite's SGD (``common.training.optim.SGD``) is PyTorch's: ``torch.optim.SGD`` computes it as it is."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from common.training.optim import SGD, Convention

__all__ = ["STOCK", "apply_steps", "make_optimizer", "stock_convention"]

# What this framework offers for the same words (``apply_steps(..., stock=True)``).
STOCK = "torch.optim.SGD, the definition"


def make_optimizer(params: Iterable[torch.nn.Parameter], sgd: SGD) -> torch.optim.SGD:
    """``torch.optim.SGD`` for ``sgd`` (dampening 0; the rate is set before every step)."""
    return torch.optim.SGD(params, lr=0.01, momentum=sgd.momentum, nesterov=sgd.nesterov, weight_decay=sgd.weight_decay)


def stock_convention(sgd: SGD) -> Convention:
    """PyTorch's stock optimizer is the definition."""
    return Convention()


def apply_steps(w0: np.ndarray, grads: list[np.ndarray], lrs: list[float], sgd: SGD, stock: bool = False) -> np.ndarray:
    """``w0`` after one step per gradient at the given rates (``stock`` changes nothing here)."""
    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = make_optimizer([w], sgd)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        w.grad = torch.from_numpy(np.array(g, dtype=w0.dtype))
        opt.step()
    return w.detach().numpy().copy()
