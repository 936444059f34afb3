"""What mixed precision's float32 parts buy, measured in PyTorch (docs/precision.md).

PyTorch's autocast (what ``--precision bfloat16`` runs: float32 weights, BatchNorm statistics,
softmax and loss in float32) against the whole network cast to bfloat16 (``net.bfloat16()``:
weights, BatchNorm and its statistics, the loss and the SGD update all in bfloat16), each against
the float64 oracle on the parity case, seeds 0-15, with the parity error model's scales. The
last row is one SGD step's update ``w1 - w0`` against the oracle's, relative to the update's size.

    .venv/bin/python docs/scripts/precision_islands.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.arch import stage_names
from common.registry import load_backend
from common.verify.harness import seeded_batches
from common.verify.parity import PARITY_CASE, _error, _oracle
from common.weights.canonical import init_canonical

LR = 0.01


def _pure_results(adapter, w0, X, y) -> tuple[dict, dict]:
    """The checks' tensors, and one SGD step's weights, with the whole network in bfloat16."""
    model = adapter.build(PARITY_CASE, seed=0)
    adapter.set_weights(model, w0)
    net = model.net.to(torch.bfloat16)
    Xb = torch.from_numpy(X).to(torch.bfloat16)
    out: dict[str, dict[str, np.ndarray]] = {}
    for check, training in (("inference", False), ("train-forward", True)):
        net.train(training)
        Z, stages = Xb, {}
        with torch.no_grad():
            for name, stage in zip(stage_names(PARITY_CASE), net.net):
                Z = stage(Z)
                stages[name] = Z.float().numpy()
        out[check] = {**stages, "logits": stages["head"]}
    net.train(True)
    Xg = Xb.clone().requires_grad_(True)
    F.cross_entropy(net(Xg), torch.from_numpy(y)).backward()
    tensors = adapter._tensors(model)
    out["grad-input"] = {"input": Xg.grad.float().numpy()}
    out["grad-params"] = {k: t.grad.float().numpy() for k, t in tensors.items() if t.grad is not None}
    before = {k: t.detach().float().numpy().copy() for k, t in tensors.items()}
    torch.optim.SGD(net.parameters(), lr=LR).step()
    return out, {k: (t.detach().float().numpy(), before[k]) for k, t in tensors.items()}


def _mixed_results(adapter, w0, X, y) -> tuple[dict, dict]:
    model = adapter.build(PARITY_CASE, seed=0, precision="bfloat16")
    out: dict[str, dict[str, np.ndarray]] = {}
    for check, training in (("inference", False), ("train-forward", True)):
        adapter.set_weights(model, w0)
        stages = adapter.stages(model, X, training=training)
        out[check] = {**stages, "logits": stages["head"]}
    adapter.set_weights(model, w0)
    _, dX, grads = adapter.loss_and_grads(model, X, y)
    out["grad-input"], out["grad-params"] = {"input": dX}, grads
    adapter.set_weights(model, w0)
    adapter.train_step(model, X, y, LR)
    return out, {k: (v, w0[k]) for k, v in adapter.get_weights(model).items()}


def _update_error(steps: dict, oracle_after: dict, w0: dict, params) -> float:
    """Largest error of the update ``w1 - w0`` relative to the oracle update's size, over the
    parameters that really move (a conv bias before a BatchNorm does not)."""
    worst = 0.0
    for k in params:
        expected = oracle_after[k] - w0[k]
        size = float(np.max(np.abs(expected)))
        if size > 1e-3 * float(np.max(np.abs(w0[k]))):
            after, before = steps[k]
            worst = max(worst, float(np.max(np.abs((after - before) - expected))) / size)
    return worst


def main() -> None:
    adapter = load_backend("torch")
    checks = ("inference", "train-forward", "grad-input", "grad-params")
    worst: dict[tuple[str, str], tuple[float, str]] = {}
    for seed in range(16):
        w0 = init_canonical(PARITY_CASE, seed)
        batches = seeded_batches(PARITY_CASE, (32, 32), 8, 1, seed)
        oracle = _oracle(PARITY_CASE, w0, batches, LR, 1, seed, momentum=False)
        X, y = batches[0]
        for mode, run in (("mixed", _mixed_results), ("pure", _pure_results)):
            got, steps = run(adapter, w0, X, y)
            errors = {c: _error(got[c], oracle.results[c], oracle.scales[c]) for c in checks}
            errors["update"] = (_update_error(steps, oracle.results["sgd-step"], w0, got["grad-params"]), "")
            for check, (error, where) in errors.items():
                if error > worst.get((mode, check), (0.0, ""))[0]:
                    worst[mode, check] = (error, f"seed {seed}" + (f", {where}" if where else ""))
    print("| check | autocast (mixed precision) | whole network in bfloat16 | ratio |")
    print("|---|---|---|---|")
    for check in (*checks, "update"):
        (m, m_where), (p, p_where) = worst["mixed", check], worst["pure", check]
        print(f"| {check} | {m:.2e} ({m_where}) | {p:.2e} ({p_where}) | {p / m:.1f}x |")


if __name__ == "__main__":
    main()
