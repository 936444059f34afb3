"""One backend's network stage by stage: layers, native output shape and parameters (the book's
``layer_summary``, for any configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.arch import plan
from common.config import DenseNetConfig
from common.layout import to_layout
from common.registry import load_backend
from common.render import format_table
from common.verify.harness import seeded_batches

# What each kind of stage is made of; "dense" is filled in per block.
_STAGE_LAYERS = {
    "stem": "conv 7x7/2 pad 3, BN, ReLU, max pool 3x3/2 pad 1",
    "dense": "{n} x ({bottleneck}BN, ReLU, conv 3x3 pad 1), concatenated",
    "transition": "BN, ReLU, conv 1x1, avg pool 2x2/2",
    "head": "BN, ReLU, global avg pool, flatten, dense",
}


@dataclass(frozen=True)
class StageRow:
    """One stage: its layers, its output shape in the framework's layout, its trainable parameters."""

    stage: str
    layers: str
    output_shape: tuple[int, ...]
    params: int


@dataclass(frozen=True)
class Summary:
    """One backend's network stage by stage, with its totals."""

    backend: str
    framework: str
    version: str
    layout: str
    config: DenseNetConfig
    input_size: tuple[int, int]
    batch: int
    stages: list[StageRow]
    num_params: int
    num_state: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "framework": self.framework,
            "version": self.version,
            "layout": self.layout,
            "config": self.config.to_dict(),
            "input_size": list(self.input_size),
            "batch": self.batch,
            "stages": [
                {"stage": s.stage, "layers": s.layers, "output_shape": list(s.output_shape), "params": s.params}
                for s in self.stages
            ],
            "num_params": self.num_params,
            "num_state": self.num_state,
        }

    def to_text(self) -> str:
        rows = [[s.stage, s.layers, str(s.output_shape), f"{s.params:,}"] for s in self.stages]
        return "\n".join(
            [
                f"{self.framework} {self.version}: DenseNet {self.config.describe()}",
                f"output shapes in {self.layout} (the framework's own layout)",
                "",
                format_table(["stage", "layers", "output shape", "params"], rows),
                "",
                f"total trainable parameters: {self.num_params:,}; BatchNorm running statistics: {self.num_state:,}",
            ]
        )


def summarize(
    backend: str, config: DenseNetConfig, input_size: int | tuple[int, int] = 96, batch: int = 1, seed: int = 0
) -> Summary:
    """Build ``config`` in ``backend`` (seeded) and run one seeded batch through it stage by stage."""
    network_plan = plan(config, input_size)  # refuses impossible sizes before any framework loads
    adapter = load_backend(backend)
    model = adapter.build(config, seed=seed)
    ((X, _),) = seeded_batches(config, network_plan.input_size, batch, 1, seed)
    outputs = adapter.stages(model, X)
    weights = adapter.get_weights(model)
    rows = []
    for name, out in outputs.items():
        kind = name.rstrip("0123456789")
        n = config.arch[int(name[len(kind) :]) - 1] if kind == "dense" else 0
        bottleneck = f"BN, ReLU, conv 1x1 to {config.bn_size * config.growth_rate}, " if config.bn_size else ""
        params = sum(v.size for k, v in weights.items() if k.split(".")[0] == name and "running" not in k)
        rows.append(
            StageRow(
                name,
                _STAGE_LAYERS[kind].format(n=n, bottleneck=bottleneck),
                tuple(int(d) for d in to_layout(out, adapter.layout).shape),
                int(params),
            )
        )
    return Summary(
        backend=adapter.name,
        framework=adapter.framework,
        version=adapter.version(),
        layout=adapter.layout,
        config=config,
        input_size=network_plan.input_size,
        batch=batch,
        stages=rows,
        num_params=adapter.num_params(model),
        num_state=adapter.num_state(model),
    )
