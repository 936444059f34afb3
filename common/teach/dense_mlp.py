"""Dense connectivity in an MLP (d2l 8.7, exercise 5), in PyTorch: imported only by the exercise.

A dense MLP feeds each hidden layer the concatenation of the input and every earlier hidden
output, as a dense block feeds its conv blocks; the output layer sees all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DenseMLP", "PlainMLP", "fit"]


class PlainMLP(nn.Module):
    """``layers`` hidden layers of ``width`` units, each fed only the one before."""

    def __init__(self, in_features: int, layers: int, width: int) -> None:
        super().__init__()
        dims = [in_features] + [width] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.out = nn.Linear(width, 1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            X = torch.relu(layer(X))
        return self.out(X).squeeze(-1)


class DenseMLP(nn.Module):
    """``layers`` hidden layers of ``width`` units, each fed everything before it."""

    def __init__(self, in_features: int, layers: int, width: int) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(in_features + i * width, width) for i in range(layers))
        self.out = nn.Linear(in_features + layers * width, 1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            X = torch.cat((X, torch.relu(layer(X))), dim=1)  # the dense block's concatenation
        return self.out(X).squeeze(-1)


def fit(
    name: str, layers: int, width: int, data: dict[str, np.ndarray], *, epochs: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Train ``PlainMLP`` (a ``name`` starting with ``plain``) or ``DenseMLP`` with Adam 3e-3, cosine annealing,
    batches of 256, on standardised targets; RMSE in the targets' unit."""
    X_train, X_test = (torch.tensor(data[k], dtype=torch.float32) for k in ("X_train", "X_test"))
    mean, std = float(data["y_train"].mean()), float(data["y_train"].std())
    y_train = torch.tensor((data["y_train"] - mean) / std, dtype=torch.float32)
    # A few thousand small matrix products: one thread is faster than two fighting over them, and
    # the figures do not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        net = (PlainMLP if name.startswith("plain") else DenseMLP)(X_train.shape[1], layers, width)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(y_train), generator=order).split(256):
                opt.zero_grad()
                nn.functional.mse_loss(net(X_train[idx]), y_train[idx]).backward()
                opt.step()
            schedule.step()
        with torch.no_grad():
            pred_train = net(X_train).numpy() * std + mean
            pred_test = net(X_test).numpy() * std + mean
    finally:
        torch.set_num_threads(threads)
    return {
        "model": name,
        "layers": layers,
        "width": width,
        "params": sum(p.numel() for p in net.parameters()),
        "train_rmse_m": float(np.sqrt(np.mean((pred_train - data["y_train"]) ** 2))),
        "test_rmse_m": float(np.sqrt(np.mean((pred_test - data["y_test"]) ** 2))),
    }
