"""Record torchvision's own DenseNet on a seeded input, for tests/test_peers.py.

torchvision does not import beside the CPU torch 2.13.0 that CI installs, so CI cannot run its
DenseNet. This script runs it where it does import (torch 2.14.1 with torchvision 0.29.1, see
docs/family.md) and stores what it computed: a small torchvision ``DenseNet`` (DenseNet-BC layers,
two dense blocks) with random weights and BatchNorm statistics, its ``state_dict`` under
torchvision's own names, a seeded input and torchvision's logits. CI then converts the state dict
with ``common.weights.peers`` and checks that every backend reproduces the logits.

    python3 -m venv /tmp/venv-tv
    /tmp/venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 "numpy<2" safetensors
    /tmp/venv-tv/bin/python tests/data/make_torchvision_vector.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.numpy import save_file

OUT = Path(__file__).with_name("torchvision_small.safetensors")
ARGS = {"growth_rate": 8, "block_config": (2, 3), "num_init_features": 16, "bn_size": 2, "num_classes": 5}


def main() -> None:
    torch.manual_seed(0)
    net = torchvision.models.DenseNet(**ARGS).eval()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            # Random BatchNorm scales, shifts and statistics, so that the conversion of each matters.
            if "norm" in name and t.is_floating_point():
                low, high = (0.5, 1.5) if name.endswith(("weight", "running_var")) else (-0.1, 0.1)
                t.copy_(torch.from_numpy(rng.uniform(low, high, tuple(t.shape)).astype(np.float32)))
    X = rng.random((2, 3, 40, 40), dtype=np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(X)).numpy()
    tensors = {f"state_dict/{k}": v.numpy() for k, v in net.state_dict().items()}
    tensors.update({"input": X, "logits": logits})
    metadata = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "densenet_args": json.dumps(ARGS),
    }
    save_file(tensors, str(OUT), metadata)
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes) with {versions}")


if __name__ == "__main__":
    main()
