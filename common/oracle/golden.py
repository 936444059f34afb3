"""Golden vectors: small framework-neutral cases any port of the d2l DenseNet can be checked against.

Each case is one safetensors file in ``common/oracle/golden/`` holding a seeded input and labels, the
canonical weights, and what the float64 numpy oracle (``common.oracle.reference``) computes from them:
every stage in inference and in training mode, and the running statistics after one
training-mode forward (PyTorch's unbiased convention). The metadata carries the configuration
and the per-check tolerances. ``densenet golden`` rewrites the files; ``densenet golden --check``
(and ``tests/test_golden.py``) fails if regenerating them no longer gives the committed numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import DenseNetConfig
from common.errors import WeightFileError
from common.oracle import reference
from common.verify.harness import seeded_batches
from common.weights.canonical import init_canonical
from common.weights.safetensors_io import load_file, save_file

GOLDEN_DIR = Path(__file__).with_name("golden")
FORMAT = "densenet-suite/golden"

# A float32 port against the float64 oracle, per group: the largest |got - expected| of a tensor
# divided by max(its largest |expected|, 1) must stay below C * 2**-24, with C from the parity
# suite's error model (common.verify.parity.ERROR_MODEL, docs/parity.md). Stored in each file's metadata.
_FLOAT32_UNIT_ROUNDOFF = 2.0**-24
TOLERANCES = {
    "inference": 256 * _FLOAT32_UNIT_ROUNDOFF,
    "train": 256 * _FLOAT32_UNIT_ROUNDOFF,
    "running": 256 * _FLOAT32_UNIT_ROUNDOFF,
}
TOLERANCE_RULE = "max|got - expected| / max(max|expected|, 1) per tensor"


def error(got: np.ndarray, expected: np.ndarray) -> float:
    """The golden files' error measure (``TOLERANCE_RULE``)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return float("inf")
    d = float(np.max(np.abs(got - expected))) if got.size else 0.0
    return d / max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1.0) if np.isfinite(d) else float("inf")


@dataclass(frozen=True)
class Case:
    name: str
    config: DenseNetConfig
    input_shape: tuple[int, int, int, int]
    seed: int
    description: str


# Growth rate 16: MXNet 1.9.1's oneDNN backward fails on some narrower networks (README).
CASES = (
    Case(
        "small",
        DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2)),
        (2, 1, 32, 32),
        0,
        "two dense blocks, 1x32x32 images",
    ),
    Case(
        "rgb_nonsquare",
        DenseNetConfig(num_channels=16, growth_rate=16, arch=(1, 1), num_classes=5, in_channels=3),
        (2, 3, 33, 40),
        1,
        "3-channel 33x40 images (odd size: floor in every pooling), 5 classes",
    ),
)


def compute(case: Case) -> dict[str, np.ndarray]:
    """Every tensor of one case, computed from its seed (float32 storage, float64 arithmetic)."""
    n, _, h, w = case.input_shape
    ((X, y),) = seeded_batches(case.config, (h, w), n, 1, case.seed)
    weights = init_canonical(case.config, case.seed)
    tensors: dict[str, np.ndarray] = {"input": X, "labels": y}
    tensors.update({f"weights/{k}": v for k, v in weights.items()})
    _, stages, _ = reference.forward(case.config, weights, X, training=False, dtype=np.float64)
    tensors.update({f"inference/{k}": v.astype(np.float32) for k, v in stages.items()})
    _, stages, stats = reference.forward(case.config, weights, X, training=True, dtype=np.float64)
    tensors.update({f"train/{k}": v.astype(np.float32) for k, v in stages.items()})
    tensors.update({f"running/{k}": v.astype(np.float32) for k, v in stats.items()})
    return tensors


def path_of(case: Case, directory: Path | None = None) -> Path:
    return (directory or GOLDEN_DIR) / f"{case.name}.safetensors"


def write(directory: Path | None = None) -> list[Path]:
    """Regenerate every case's file (atomically)."""
    paths = []
    for case in CASES:
        metadata = {
            "format": FORMAT,
            "case": case.name,
            "description": case.description,
            "config": json.dumps(case.config.to_dict()),
            "seed": str(case.seed),
            "tolerances": json.dumps(TOLERANCES),
            "tolerance_rule": TOLERANCE_RULE,
            "oracle": "common.oracle.reference in float64; running statistics fed the unbiased batch variance",
        }
        path = path_of(case, directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(compute(case), path, metadata)
        paths.append(path)
    return paths


@dataclass
class Golden:
    case: str
    config: DenseNetConfig
    tensors: dict[str, np.ndarray]
    tolerances: dict[str, float]

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """``{name: array}`` of the tensors stored under ``prefix/``."""
        return {k[len(prefix) + 1 :]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}


def load(case: Case, directory: Path | None = None) -> Golden:
    tensors, metadata = load_file(path_of(case, directory))
    if metadata.get("format") != FORMAT:
        raise WeightFileError(f"{path_of(case, directory)} is not a densenet-suite golden file")
    config = DenseNetConfig.from_dict(json.loads(metadata["config"]))
    return Golden(case.name, config, tensors, json.loads(metadata["tolerances"]))


def drift(directory: Path | None = None) -> list[str]:
    """How the committed files differ from what the oracle computes now (empty: no drift).

    Inputs, labels and weights must be bit-identical; computed values may move by a float32 ulp,
    since a different BLAS can round the float64 arithmetic differently.
    """
    problems = []
    for case in CASES:
        try:
            stored = load(case, directory).tensors
        except (OSError, WeightFileError) as exc:
            problems.append(f"{case.name}: {exc}")
            continue
        fresh = compute(case)
        if list(stored) != list(fresh):
            problems.append(f"{case.name}: tensor names differ from a fresh computation")
            continue
        for k, v in fresh.items():
            exact = k.split("/")[0] in ("input", "labels", "weights")
            same = (
                np.array_equal(stored[k], v)
                if exact
                else stored[k].shape == v.shape and np.allclose(stored[k], v, rtol=1e-6, atol=1e-7)
            )
            if not same or stored[k].dtype != v.dtype:
                problems.append(f"{case.name}: {k} drifted")
    return problems
