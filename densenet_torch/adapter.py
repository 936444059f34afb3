"""The harness's view of the PyTorch DenseNet (see ``common.adapter``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.adapter import Adapter, Model
from common.config import DenseNetConfig, min_input_size
from densenet_torch.model import DenseBlock, DenseNet, transition_block


class TorchAdapter(Adapter):
    name = "torch"
    framework = "PyTorch"
    layout = "NCHW"
    running_var_unbiased = True

    def version(self) -> str:
        return torch.__version__

    def build(self, config: DenseNetConfig, seed: int = 0) -> Model:
        torch.manual_seed(seed)
        net = DenseNet(config.num_channels, config.growth_rate, config.arch, config.lr, config.num_classes)
        net.eval()
        size = min_input_size(config)
        with torch.no_grad():  # materialise the lazy modules
            net(torch.zeros(1, config.in_channels, size, size))
        return Model(config, net)

    def _to_native(self, X: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(X)

    def _to_numpy(self, Y: torch.Tensor) -> np.ndarray:
        return Y.detach().numpy()

    def _forward(self, model: Model, X: torch.Tensor, training: bool, compiled: bool) -> torch.Tensor:
        net = model.net
        if compiled:
            if "compiled" not in model.cache:
                model.cache["compiled"] = torch.compile(model.net)
            net = model.cache["compiled"]
        model.net.train(training)
        with torch.no_grad():
            return net(X)

    def _stages(self, model: Model, X: torch.Tensor, training: bool) -> list[torch.Tensor]:
        model.net.train(training)
        outs = []
        with torch.no_grad():
            for stage in model.net.net:
                X = stage(X)
                outs.append(X)
        return outs

    def _block(self, kind: str, num_convs: int, num_channels: int, X: torch.Tensor) -> torch.Tensor:
        blk = DenseBlock(num_convs, num_channels) if kind == "dense" else transition_block(num_channels)
        with torch.no_grad():
            return blk(X)

    def _tensors(self, model: Model) -> dict[str, torch.Tensor]:
        """Canonical name -> the module's own tensor (parameter or buffer)."""
        out: dict[str, torch.Tensor] = {}

        def conv(prefix: str, m: torch.nn.Module) -> None:
            out[f"{prefix}.conv.weight"], out[f"{prefix}.conv.bias"] = m.weight, m.bias

        def bn(prefix: str, m: torch.nn.Module) -> None:
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                out[f"{prefix}.bn.{leaf}"] = getattr(m, leaf)

        stages = list(model.net.net)
        conv("stem", stages[0][0])
        bn("stem", stages[0][1])
        k = 1
        for i in range(len(model.config.arch)):
            for j, blk in enumerate(stages[k].net):
                bn(f"dense{i + 1}.conv{j + 1}", blk[0])
                conv(f"dense{i + 1}.conv{j + 1}", blk[2])
            k += 1
            if i != len(model.config.arch) - 1:
                bn(f"transition{i + 1}", stages[k][0])
                conv(f"transition{i + 1}", stages[k][2])
                k += 1
        bn("head", stages[k][0])
        out["head.fc.weight"], out["head.fc.bias"] = stages[k][4].weight, stages[k][4].bias
        return out

    def _read(self, model: Model) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self._tensors(model).items()}

    def _write(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, t in self._tensors(model).items():
                t.copy_(torch.from_numpy(weights[k]))

    def _loss(self, model: Model, X: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        model.net.train(True)
        y = self.check_labels(X, y, model.config.num_classes)
        return F.cross_entropy(model.net(X), torch.from_numpy(y))

    def loss_and_grads(self, model, X, y):
        X = self.prepare(model, X).requires_grad_(True)
        model.net.zero_grad(set_to_none=True)
        loss = self._loss(model, X, y)
        loss.backward()
        grads = {k: t.grad.numpy().copy() for k, t in self._tensors(model).items() if t.requires_grad}
        model.net.zero_grad(set_to_none=True)
        return float(loss.detach()), X.grad.numpy().copy(), grads

    def sgd_step(self, model, X, y, lr):
        opt = torch.optim.SGD(model.net.parameters(), lr=lr)
        opt.zero_grad(set_to_none=True)
        loss = self._loss(model, self.prepare(model, X), y)
        loss.backward()
        opt.step()
        return float(loss.detach())
