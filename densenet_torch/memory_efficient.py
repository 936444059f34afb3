"""The memory-efficient dense block in PyTorch (not in the book): NCHW, channels on axis 1.

Each dense layer keeps only its new features; the backward pass recomputes the rest of the layer
(the concatenation, BatchNorms, ReLUs and convolutions) with ``torch.utils.checkpoint``, PyTorch's
own mechanism (Pleiss et al. 2017; docs/performance.md). ``model.DenseBlock(...,
memory_efficient=True)`` runs its conv blocks through :func:`forward_recomputed`; this module
works on them as plain modules and needs nothing from ``model.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["can_recompute", "forward_recomputed"]


@contextmanager
def _running_stats_kept(layers: list[nn.Module]) -> Iterator[None]:
    """The recomputation in the backward pass leaves the running statistics as the forward pass
    left them: BatchNorm counts each batch once.

    Restored rather than switched off: a BatchNorm that tracks no statistics saves fewer tensors
    for its backward, and the checkpoint requires the recomputation to save what the forward did.
    ``.data`` writes without bumping the version counters autograd checks.
    """
    norms = [m for m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [[b.detach().clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        for m, values in zip(norms, kept):
            for b, value in zip(m.buffers(), values):
                b.data.copy_(value)


def _run(layers: list[nn.Module], X: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        # In place, so that the recomputation allocates less. Autograd allows it: BatchNorm keeps
        # its input, not its output, and ReLU keeps its output.
        X = torch.relu_(X) if isinstance(layer, nn.ReLU) else layer(X)
    return X


def can_recompute(block: nn.Module) -> bool:
    """Whether this call of the dense block ``block`` recomputes: autograd records, and its lazy
    modules have their shapes (they take them on the first call, which must not happen inside a
    checkpoint)."""
    lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in block.parameters())
    return torch.is_grad_enabled() and not lazy


def forward_recomputed(block: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The dense block ``block`` (its conv blocks in ``block.net``), keeping only each layer's new
    features: (N, C, H, W) -> (N, C + num_convs * num_channels, H, W).

    Each conv block but its dropout runs under the checkpoint. torchvision's ``memory_efficient``
    recomputes less (up to the first convolution) and keeps more (the bottleneck's output and its
    BatchNorm-ReLU).
    """
    features = [X]  # each layer's new features, stored once; nothing else of a layer is
    for blk in block.net:
        layers = list(blk)
        split = len(layers) - 1 if isinstance(layers[-1], nn.Dropout) else len(layers)
        recomputed, tail = layers[:split], layers[split:]

        def run(*features: torch.Tensor, recomputed: list[nn.Module] = recomputed) -> torch.Tensor:
            return _run(recomputed, torch.cat(features, dim=1))

        Y = checkpoint(
            run,
            *features,
            use_reentrant=False,
            # (forward, recomputation): the running statistics take this batch once.
            context_fn=lambda recomputed=recomputed: (nullcontext(), _running_stats_kept(recomputed)),
        )
        features.append(_run(tail, Y))
    return torch.cat(features, dim=1)
