"""The harness's view of the PyTorch DenseNet (see ``common.adapter``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.adapter import Adapter, Model, check_dtype, check_precision
from common.arch import min_input_size
from common.config import DenseNetConfig
from common.process import threads
from densenet_torch.model import DenseBlock, DenseNet, TransitionBlock, transition_block
from densenet_torch.optim import make_optimizer

# PyTorch has no environment switch for oneDNN; `densenet parity-sweep` measures rounding with it
# off as well (common.verify.parity.sweep_environment).
if os.environ.get("DENSENET_ONEDNN") == "0":
    torch.backends.mkldnn.enabled = False

# `--threads N` (common.process.threads): OMP_NUM_THREADS already sized the intra-op pool when
# torch was imported; the inter-op pool has no variable, only this call, which works once and
# only before the pool starts (a process that used torch before loading the adapter keeps its own).
if (_threads := threads.requested()) is not None:
    torch.set_num_threads(_threads)
    if torch.get_num_interop_threads() != _threads:
        try:
            torch.set_num_interop_threads(_threads)
        except RuntimeError:
            pass


def _at_least_float32(Y: torch.Tensor) -> torch.Tensor:
    """Autocast's bfloat16 logits or activations as float32 (for the loss, and for numpy, which has
    no bfloat16); float32 and float64 tensors unchanged."""
    return Y.float() if Y.dtype == torch.bfloat16 else Y


@dataclass
class TorchRuntime:
    """What the PyTorch adapter keeps beside a network; both made on first use."""

    compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
    """``torch.compile(net)``, for ``forward(..., compiled=True)``."""
    sgd: torch.optim.SGD | None = None
    """The optimizer ``train_step`` steps, for ``Model.sgd`` (its learning rate is set on every call)."""
    memory_format: torch.memory_format = torch.channels_last
    """How the network's 4-D tensors and its inputs are laid out in memory (the shapes stay NCHW)."""


TorchModel = Model[TorchRuntime]


class TorchAdapter(Adapter[TorchRuntime]):
    name = "torch"
    export_module = "densenet_torch.export"
    framework = "PyTorch"
    layout = "NCHW"
    running_var_unbiased = True
    # torch.compile does not repay its compiling per batch shape, so training and evaluation run
    # eagerly: docs/performance.md#what-each-backend-runs-by-default-and-why.
    prefers_compiled = False
    # "nchw": eager in the book's contiguous NCHW memory format, for the comparison.
    bench_modes = ("eager", "compile", "nchw")

    def version(self) -> str:
        return torch.__version__

    def build(
        self,
        config: DenseNetConfig,
        seed: int = 0,
        dtype: str = "float32",
        *,
        memory_efficient: bool = False,
        precision: str = "float32",
    ) -> TorchModel:
        dtype = check_dtype(dtype)
        precision = check_precision(precision, dtype)
        torch.manual_seed(seed)
        net = DenseNet.for_config(config, memory_efficient=memory_efficient)
        net.eval()
        size = min_input_size(config)
        with torch.no_grad():  # materialise the lazy modules
            net(torch.zeros(1, config.in_channels, size, size))
        if dtype == "float64":
            net.double()  # every parameter and buffer; activations follow the input's dtype
        model = Model(config, net, TorchRuntime(), dtype=dtype, precision=precision)
        # oneDNN's convolutions, BatchNorm and pooling run faster on NHWC memory
        # (docs/performance.md#what-each-backend-runs-by-default-and-why); the tensors keep their
        # NCHW shapes.
        self.set_memory_format(model, torch.channels_last)
        return model

    @staticmethod
    def set_memory_format(model: TorchModel, memory_format: torch.memory_format) -> None:
        """Lay out the network's 4-D tensors, and the inputs ``prepare`` makes for it, in
        ``memory_format`` (``torch.channels_last`` by default; ``torch.contiguous_format`` is the
        book's NCHW). Only strides change, never shapes or values."""
        model.runtime.memory_format = memory_format
        model.net.to(memory_format=memory_format)

    def prepare(self, model: TorchModel | None, X: np.ndarray, min_size: int | None = None) -> torch.Tensor:
        X = super().prepare(model, X, min_size)
        return X if model is None else X.contiguous(memory_format=model.runtime.memory_format)

    def _to_native(self, X: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(X)

    def _to_numpy(self, Y: torch.Tensor) -> np.ndarray:
        return _at_least_float32(Y.detach()).numpy()  # numpy has no bfloat16

    @staticmethod
    def autocast(model: TorchModel) -> torch.autocast:
        """PyTorch's mixed precision: inside, convolutions and matrix products run in bfloat16 on
        float32 weights, while BatchNorm keeps float32 statistics and softmax and the loss run in
        float32 (autocast's own lists); off for a float32 model."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.precision == "bfloat16")

    def _forward(self, model: TorchModel, X: torch.Tensor, training: bool, compiled: bool) -> torch.Tensor:
        net = model.net
        if compiled:
            if model.runtime.compiled is None:
                model.runtime.compiled = torch.compile(model.net)
            net = model.runtime.compiled
        model.net.train(training)
        # inference_mode: no autograd bookkeeping at all (no version counters, no views tracked).
        with torch.inference_mode(), self.autocast(model):
            return _at_least_float32(net(X))

    def _stages(self, model: TorchModel, X: torch.Tensor, training: bool) -> list[torch.Tensor]:
        model.net.train(training)
        outs = []
        with torch.no_grad(), self.autocast(model):
            for stage in model.net.net:
                X = stage(X)
                outs.append(X)
        return outs

    def _block(self, kind: str, X: torch.Tensor, num_channels: int, *, num_convs: int) -> torch.Tensor:
        blk = DenseBlock(num_convs, num_channels) if kind == "dense" else transition_block(num_channels)
        with torch.no_grad():
            return blk(X)

    def _layers(self, model: TorchModel) -> list[tuple[str, torch.nn.Module]]:
        kinds = ((torch.nn.Conv2d, "conv"), (torch.nn.BatchNorm2d, "bn"), (torch.nn.Linear, "fc"))
        return [(kind, m) for m in model.net.modules() for cls, kind in kinds if isinstance(m, cls)]

    def _layer_tensors(self, kind: str, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        leaves = ("weight", "bias", "running_mean", "running_var") if kind == "bn" else ("weight", "bias")
        return {leaf: getattr(layer, leaf) for leaf in leaves if getattr(layer, leaf) is not None}

    def _read(self, model: TorchModel) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self._tensors(model).items()}

    def _write(self, model: TorchModel, weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, t in self._tensors(model).items():
                t.copy_(torch.from_numpy(weights[k]))

    def _loss(self, model: TorchModel, X: torch.Tensor, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        model.net.train(True)
        y = self.check_labels(X, y, model.config.num_classes)
        with self.autocast(model):
            logits = _at_least_float32(model.net(X))
        return F.cross_entropy(logits, torch.from_numpy(y)), logits

    def loss_and_grads(self, model, X, y):
        X = self.prepare(model, X).requires_grad_(True)
        model.net.zero_grad(set_to_none=True)
        loss, _ = self._loss(model, X, y)
        loss.backward()
        grads = {k: t.grad.numpy().copy() for k, t in self._tensors(model).items() if t.requires_grad}
        model.net.zero_grad(set_to_none=True)
        return float(loss.detach()), X.grad.numpy().copy(), grads

    def _optimizer(self, model: TorchModel) -> torch.optim.SGD:
        if model.runtime.sgd is None:
            model.runtime.sgd = make_optimizer(model.net.parameters(), model.sgd)
        return model.runtime.sgd

    def _reset_optimizer(self, model: TorchModel) -> None:
        model.runtime.sgd = None

    def _read_velocities(self, model: TorchModel) -> dict[str, np.ndarray]:
        state = self._optimizer(model).state
        out = {}
        for k, t in self._tensors(model).items():
            buf = state[t].get("momentum_buffer") if t in state else None
            if buf is not None:
                out[k] = buf.detach().numpy().copy()
        return out

    def _write_velocities(self, model: TorchModel, velocities: dict[str, np.ndarray]) -> None:
        state = self._optimizer(model).state
        for k, t in self._tensors(model).items():
            if k in velocities:
                # empty_like: the velocity takes its parameter's memory format, as torch's own does.
                state[t]["momentum_buffer"] = torch.empty_like(t).copy_(torch.from_numpy(velocities[k]))

    def bench_step(self, model, phase, mode, X, y, lr=0.01):
        if mode == "nchw":
            self.set_memory_format(model, torch.contiguous_format)
            return super().bench_step(model, phase, "eager", X, y, lr)
        if not (phase == "train" and mode == "compile"):
            return super().bench_step(model, phase, mode, X, y, lr)
        # The forward and backward passes compiled together (AOTAutograd); the update stays eager.
        net = torch.compile(model.net)
        opt = torch.optim.SGD(model.net.parameters(), lr=lr)
        X, y = self.prepare(model, X), torch.from_numpy(self.check_labels(X, y, model.config.num_classes))

        def step() -> None:
            model.net.train(True)
            opt.zero_grad(set_to_none=True)
            with self.autocast(model):
                logits = _at_least_float32(net(X))
            F.cross_entropy(logits, y).backward()
            opt.step()

        return step

    def train_step(self, model, X, y, lr, compiled=False):
        # Eager even when compiled: see prefers_compiled.
        opt = self._optimizer(model)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss, logits = self._loss(model, self.prepare(model, X), y)
        loss.backward()
        opt.step()
        return float(loss.detach()), logits.detach().numpy()

    def use_max_pool_in_transitions(self, model: TorchModel) -> int:
        # A pool holds no weights: the module is replaced in place, canonical weights unchanged.
        blocks = [m for m in model.net.modules() if isinstance(m, TransitionBlock)]
        for blk in blocks:
            blk[-1] = torch.nn.MaxPool2d(kernel_size=2, stride=2)
        return len(blocks)
