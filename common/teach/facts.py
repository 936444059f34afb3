"""The measured facts the page shows: stage shapes, parameters, padding, BatchNorm defaults, parity.

Everything here but :func:`measure_backends` is computed from the configuration and the numpy
oracle, without a framework, so the page builds fast anywhere; :func:`measure_backends` (behind
``densenet teach --measure``) builds every installed backend, as ``densenet compare`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.arch import STEM_CONV, STEM_POOL, canonical_spec, is_state, plan, walk
from common.config import DenseNetConfig
from common.registry import BACKENDS, load_backend
from common.verify.harness import run_backend, seeded_batches
from common.verify.parity import run_naive

__all__ = [
    "BackendFacts",
    "NAIVE_SETUP",
    "ParityResults",
    "StageFact",
    "measure_backends",
    "naive_rows",
    "read_benchmark",
    "read_parity",
    "same_padding",
    "stage_facts",
]


@dataclass(frozen=True)
class StageFact:
    """One stage of the plan: NCHW shape, parameters and multiply-adds (one image)."""

    stage: str
    nchw: tuple[int, ...]
    params: int
    macs: int

    @property
    def nhwc(self) -> tuple[int, ...]:
        if len(self.nchw) != 4:
            return self.nchw
        n, c, h, w = self.nchw
        return (n, h, w, c)


def stage_facts(config: DenseNetConfig, input_size: int = 96, batch: int = 1) -> list[StageFact]:
    """The stage table ``densenet compare`` prints as "expected", with parameters and cost per stage."""
    network = plan(config, input_size)
    params: dict[str, int] = {}
    for name, shape in canonical_spec(config).items():
        if not is_state(name):
            params[name.split(".", 1)[0]] = params.get(name.split(".", 1)[0], 0) + math.prod(shape)
    macs: dict[str, int] = {}
    for layer in walk(config, network.input_size):
        if layer.kind == "conv":
            h, w = layer.out_size
            cost = layer.in_channels * layer.out_channels * layer.kernel**2 * h * w
        elif layer.kind == "fc":
            cost = layer.in_channels * layer.out_channels
        else:
            continue
        macs[layer.stage] = macs.get(layer.stage, 0) + cost
    return [StageFact(s.name, s.shape(batch), params.get(s.name, 0), macs.get(s.name, 0)) for s in network.stages]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """What TensorFlow's and Flax's ``'same'`` pads (before, after) on one side of ``size``:
    the total ``max((ceil(size / stride) - 1) * stride + kernel - size, 0)``, the odd one after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@dataclass(frozen=True)
class PaddingFact:
    """The book's 'same' padding against the explicit one, for one stride-2 layer."""

    layer: str
    input_side: int
    same: tuple[int, int]
    explicit: tuple[int, int]


def padding_facts(input_size: int = 96) -> list[PaddingFact]:
    """The stem conv and max pool at ``input_size``: 'same' is asymmetric at even sides."""
    conv_k, conv_s, conv_p = STEM_CONV
    pool_k, pool_s, pool_p = STEM_POOL
    after_conv = (input_size + 2 * conv_p - conv_k) // conv_s + 1
    return [
        PaddingFact("stem conv 7x7/2", input_size, same_padding(input_size, conv_k, conv_s), (conv_p, conv_p)),
        PaddingFact("stem max pool 3x3/2", after_conv, same_padding(after_conv, pool_k, pool_s), (pool_p, pool_p)),
    ]


# The setup of the --naive table in docs/parity.md: the book's network, 8x1x32x32, seed 0.
NAIVE_SETUP = {"input_size": 32, "batch": 8, "seed": 0}


def naive_rows(config: DenseNetConfig | None = None) -> list[dict[str, Any]]:
    """``densenet parity --naive`` on the book's network: what each framework default changes
    (the numpy oracle, float64 unless the row says otherwise; about a second)."""
    from dataclasses import asdict

    return [asdict(r) for r in run_naive(config or DenseNetConfig(), **NAIVE_SETUP)]


@dataclass
class ParityResults:
    """One ``densenet parity --json`` output, with the file it came from."""

    source: str
    data: dict[str, Any]

    @property
    def dtype(self) -> str:
        return self.data.get("dtype", "float32")

    def worst(self) -> list[dict[str, Any]]:
        """Per check, the comparison with the smallest margin (oracle and pairwise alike)."""
        worst: dict[str, dict[str, Any]] = {}
        for c in self.data.get("comparisons", []):
            margin = c["margin"] if c["margin"] is not None else math.inf
            if c["check"] not in worst or margin < worst[c["check"]]["_margin"]:
                worst[c["check"]] = {**c, "_margin": margin}
        return list(worst.values())


def read_parity(path: str | Path) -> ParityResults:
    """A results file written by ``densenet parity --json`` (one seed)."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if "reports" in data:  # --seeds: the first report, the summary is per check anyway
        data = {**data["reports"][0], "naive": data.get("naive", [])}
    if "comparisons" not in data:
        raise ValueError(f"{path} is not the output of `densenet parity --json`")
    return ParityResults(str(path), data)


def read_benchmark(path: str | Path) -> dict[str, Any]:
    """A benchmark results file: ``{"title": ..., "rows": [{"backend": ..., <metric>: number}]}``,
    optionally ``"metrics"`` (which to chart; default every numeric one), ``"labels"`` and ``"note"``
    (``densenet exercise memory --save FILE`` writes one)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: expected an object with a 'rows' list")
    return data


@dataclass
class BackendFacts:
    """What one backend built: stage shapes (NCHW), parameters per stage and in all, or why not."""

    name: str
    framework: str
    status: str
    version: str | None = None
    error: str | None = None
    stages: dict[str, tuple[int, ...]] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    num_params: int | None = None


def measure_backends(
    config: DenseNetConfig, input_size: int = 96, progress: Callable[[str], None] | None = None
) -> list[BackendFacts]:
    """Build the network in every installed backend and record shapes and parameters per stage."""

    say = progress or (lambda message: None)
    network = plan(config, input_size)
    ((X, _),) = seeded_batches(config, network.input_size, 1, 1, 0)
    out = []
    for name in BACKENDS:
        say(f"{name}: building and running one image")
        run = run_backend(name, config, X)
        facts = BackendFacts(name, run.framework, run.status, run.version, run.error, run.stages)
        if run.status == "ok":
            adapter = load_backend(name)
            weights = adapter.get_weights(adapter.build(config, seed=0))
            for key, value in weights.items():
                if not is_state(key):
                    stage = key.split(".", 1)[0]
                    facts.params[stage] = facts.params.get(stage, 0) + int(value.size)
            facts.num_params = run.num_params
        out.append(facts)
    return out
