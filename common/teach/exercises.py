"""The exercises of d2l section 8.7, answered with numbers (``densenet exercise ...``,
docs/exercises.md).

1. ``pooling``: average vs max pooling in the transition layer, trained with one seed and recipe.
2. ``params``: why DenseNet has fewer parameters than ResNet, stage by stage.
3. ``memory``: peak memory of a training step at 224x224, per backend.
4. ``family``: the variants of the paper's Table 1, parameters and multiply-adds.
5. ``dense-mlp``: dense connectivity in an MLP, on a regression data set shipped in a package.

Importing this module imports no framework; each exercise loads what it needs when it runs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.arch import count_macs, count_params, walk
from common.config import CONFIGS, D2L, DenseNetConfig
from common.errors import DenseNetError
from common.process import allocator
from common.registry import load_backend
from common.resources import child_env
from common.teach.facts import stage_facts
from common.training.callbacks import EpochLines
from common.training.plot import plot_runs
from common.training.run import train
from common.training.rundir import RunDir
from common.training.settings import TRANSITION_POOLS, TrainSettings
from common.verify.harness import seeded_batches

__all__ = [
    "PUBLISHED",
    "RESNET50_PUBLISHED",
    "ResNetSpec",
    "densenet_stage_params",
    "family_rows",
    "memory_child",
    "memory_rows",
    "resnet_stages",
    "run_dense_mlp",
    "run_pooling",
]

# Parameter counts as torchvision publishes them (1000 classes, 3 channels).
PUBLISHED = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
RESNET50_PUBLISHED = 25_557_032


# ---------------------------------------------------------------------------------------------
# 1. average vs max pooling in the transition layer


def run_pooling(
    backend: str,
    pools: list[str],
    out: Path,
    *,
    epochs: int = 5,
    resize: int = 32,
    lr: float = 0.1,
    batch_size: int = 128,
    limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train the book's network once per transition pool (``avg``, ``max``) with one seed and
    the recipe of docs/training.md (SGD, cosine annealing), each a full training run
    (:func:`common.training.run.train`) in ``out/pool-<pool>``; the curves of all in
    ``out/curves.png``. A directory that already holds a run is refused, as by ``densenet train``."""
    say = progress or (lambda message: None)
    for pool in pools:
        if pool not in TRANSITION_POOLS:
            raise DenseNetError(f"transition pool must be avg or max, got {pool!r}")
    runs = {pool: out / f"pool-{pool}" for pool in pools}
    for run in runs.values():  # every refusal before the first run trains
        RunDir(run).check()
    results: dict[str, list[dict[str, Any]]] = {}
    for pool, run in runs.items():
        settings = TrainSettings(
            backend=backend,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            resize=resize,
            limit=limit,
            test_limit=test_limit,
            seed=seed,
            lr_schedule="cosine",
            transition_pool=pool,
        )

        def line(m: dict[str, Any], pool: str = pool) -> None:
            acc, loss = m["test_acc"], m["test_loss"]
            say(f"{pool} pool, epoch {m['epoch']}/{epochs}: test accuracy {acc:.4f}, loss {loss:.4f}")

        results[pool] = train(settings, run, progress=False, callbacks=[EpochLines(line)])
    plot_runs(list(runs.values()), out / "curves.png")
    return results


# ---------------------------------------------------------------------------------------------
# 2. parameters: DenseNet against ResNet


@dataclass(frozen=True)
class ResNetSpec:
    """A ResNet as the book (basic blocks, conv biases) or torchvision (bottlenecks) builds it."""

    name: str
    arch: tuple[tuple[int, int], ...]  # (residual blocks, channels) per stage
    bottleneck: bool = False
    conv_bias: bool = True
    in_channels: int = 1
    num_classes: int = 10


BOOK_RESNET18 = ResNetSpec("ResNet-18 (the book's, d2l 8.6)", ((2, 64), (2, 128), (2, 256), (2, 512)))
RESNET50 = ResNetSpec(
    "ResNet-50 (torchvision)",
    ((3, 64), (4, 128), (6, 256), (3, 512)),
    bottleneck=True,
    conv_bias=False,
    in_channels=3,
    num_classes=1000,
)


def resnet_stages(spec: ResNetSpec, input_size: int = 224) -> list[tuple[str, int, int]]:
    """``(stage, parameters, multiply-adds)`` per stage: stem, stage1..4, head. Basic blocks are
    two 3x3 convolutions (the book's ``Residual``), bottlenecks 1x1, 3x3, 1x1 with 4x expansion;
    the first block of a stage after the first strides by 2 and projects its shortcut (1x1)."""
    bias = 1 if spec.conv_bias else 0

    def conv(cin: int, cout: int, k: int, hw: int) -> tuple[int, int]:
        return cin * cout * k * k + bias * cout, cin * cout * k * k * hw * hw

    size = (input_size + 6 - 7) // 2 + 1  # stem conv 7x7/2 pad 3
    p, m = conv(spec.in_channels, 64, 7, size)
    rows = [("stem", p + 2 * 64, m)]
    size = (size + 2 - 3) // 2 + 1  # max pool 3x3/2 pad 1
    channels = 64
    for i, (blocks, width) in enumerate(spec.arch, start=1):
        params = macs = 0
        for b in range(blocks):
            stride = 2 if b == 0 and i > 1 else 1
            out_size = (size - 1) // stride + 1
            out = width * 4 if spec.bottleneck else width
            if spec.bottleneck:
                layers = [
                    conv(channels, width, 1, size),
                    conv(width, width, 3, out_size),
                    conv(width, out, 1, out_size),
                ]
                bn = 2 * (width + width + out)
            else:
                layers = [conv(channels, width, 3, out_size), conv(width, width, 3, out_size)]
                bn = 2 * (width + width)
            if channels != out or stride != 1:  # the projection shortcut
                layers.append(conv(channels, out, 1, out_size))
                bn += 2 * out if spec.bottleneck else 0  # torchvision normalises it, the book does not
            params += sum(p for p, _ in layers) + bn
            macs += sum(m for _, m in layers)
            channels, size = out, out_size
        rows.append((f"stage{i}", params, macs))
    rows.append(("head", channels * spec.num_classes + spec.num_classes, channels * spec.num_classes))
    return rows


def densenet_stage_params(config: DenseNetConfig, input_size: int = 224) -> list[tuple[str, int, int]]:
    """``(stage, parameters, multiply-adds)`` per stage, the transitions folded into the dense block
    before them, so the rows line up with ResNet's stages."""

    rows: list[tuple[str, int, int]] = []
    for s in stage_facts(config, input_size):
        if s.stage.startswith("transition"):
            name, p, m = rows[-1]
            rows[-1] = (name, p + s.params, m + s.macs)
        else:
            name = s.stage.replace("dense", "stage")
            rows.append((name, s.params, s.macs))
    return rows


# ---------------------------------------------------------------------------------------------
# 3. memory of a training step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def activation_bytes(config: DenseNetConfig, input_size: int, batch: int) -> tuple[int, int]:
    """float32 bytes of every layer output of one forward pass (what a plain implementation keeps
    for the backward pass), and of the dense blocks' concatenations alone (the part that grows
    with the square of the block length, which memory-efficient DenseNets recompute)."""
    total = concat = 0
    for layer in walk(config, input_size):
        h, w = layer.out_size
        size = layer.out_channels * h * w * batch * 4
        total += size
        if layer.kind == "concat":
            concat += size
    return total, concat


def memory_child(backend: str, input_size: int, batch: int, memory_efficient: bool = False) -> dict[str, Any]:
    """Measured in this process: resident memory after building the book's network (standard or
    ``memory_efficient``), and the peak during its first training step (eager where the framework
    allows; JAX's step is jitted, so its time and peak include compiling it)."""

    adapter = load_backend(backend)
    model = adapter.build(D2L, seed=0, memory_efficient=memory_efficient)
    ((X, y),) = seeded_batches(D2L, (input_size, input_size), batch, 1, 0)
    before = _rss_bytes()
    started = time.perf_counter()
    adapter.train_step(model, X, y, 0.01, compiled=False)
    # Reading the weights waits for the update: MXNet's engine (and any asynchronous framework)
    # may still be running the backward pass when the step returns its loss.
    adapter.get_weights(model)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {
        "backend": adapter.name,
        "version": adapter.version(),
        "memory_efficient": memory_efficient,
        "rss_after_build_mb": before / 2**20,
        "peak_mb": peak / 2**20,
        "step_peak_mb": (peak - before) / 2**20,
        "step_seconds": seconds,
        **allocator.engine_record(adapter.name),
    }


def memory_rows(
    backends: list[str],
    input_size: int = 224,
    batch: int = 32,
    progress: Callable[[str], None] | None = None,
    memory_efficient: bool = False,
) -> list[dict[str, Any]]:
    """:func:`memory_child` for each backend in a fresh process (a process's peak memory is a
    high-water mark that only one measurement may own)."""
    say = progress or (lambda message: None)
    env = child_env(os.environ)
    rows = []
    for backend in backends:
        say(f"{backend}: one training step at {input_size}x{input_size}, batch {batch}")
        cmd = [sys.executable, "-m", "common", "exercise", "memory", "--child", backend]
        cmd += ["--input-size", str(input_size), "--batch-size", str(batch)]
        cmd += ["--memory-efficient"] if memory_efficient else []
        # The child's step is eager: on the engine `densenet train` runs that network on.
        backend_env = allocator.mxnet_engine_env(env, backend, memory_efficient)
        done = subprocess.run(cmd, capture_output=True, text=True, env=backend_env, timeout=1800, check=False)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            rows.append({"backend": backend, "error": f"exit {done.returncode}: {tail}"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


# ---------------------------------------------------------------------------------------------
# 4. the family of Table 1


def family_rows(input_size: int = 224) -> list[dict[str, Any]]:
    """Every named configuration: growth rate, blocks, parameters (and the published count) and
    multiply-adds per image."""
    rows = []
    for name, config in CONFIGS.items():
        rows.append(
            {
                "name": name,
                "growth_rate": config.growth_rate,
                "blocks": config.arch,
                "num_channels": config.num_channels,
                "bottleneck": config.bn_size is not None,
                "params": count_params(config),
                "published": PUBLISHED.get(name),
                "gmacs": count_macs(config, input_size) / 1e9,
                "depth": 1 + sum(config.arch) * (2 if config.bn_size else 1) + len(config.arch) - 1 + 1,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 5. dense connectivity in an MLP


def dem_regression(seed: int = 0, n_train: int = 4000, n_test: int = 4000) -> dict[str, np.ndarray]:
    """Elevation from position on the terrain model matplotlib ships (``jacksboro_fault_dem.npz``,
    a USGS 344 x 403 grid, 10 m spacing): standardised (x, y) -> elevation, random disjoint points."""
    from matplotlib import cbook

    with np.load(cbook.get_sample_data("jacksboro_fault_dem.npz", asfileobj=False)) as dem:
        z = dem["elevation"].astype(np.float64)
    rows, cols = np.indices(z.shape)
    X = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    y = z.ravel()
    pick = np.random.default_rng(seed).permutation(len(y))[: n_train + n_test]
    X, y = X[pick], y[pick]
    mean, std = X[:n_train].mean(axis=0), X[:n_train].std(axis=0)
    X = (X - mean) / std
    return {"X_train": X[:n_train], "y_train": y[:n_train], "X_test": X[n_train:], "y_test": y[n_train:]}


def run_dense_mlp(
    widths: dict[str, tuple[int, int]] | None = None, epochs: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    """A plain MLP against a dense MLP (:mod:`common.teach.dense_mlp`), each ``(layers, width)``,
    trained with Adam on the same data, seed and recipe; RMSE in metres, and the error of
    predicting the mean for scale."""
    from common.teach import dense_mlp  # imports PyTorch: only when this exercise runs

    # Pairs of about the same number of parameters, shallow and deep.
    widths = widths or {"plain": (4, 64), "dense": (4, 44), "plain-deep": (8, 44), "dense-deep": (8, 20)}
    d = dem_regression(seed)
    rows = [dense_mlp.fit(name, layers, width, d, epochs=epochs, seed=seed) for name, (layers, width) in widths.items()]
    baseline = float(np.sqrt(np.mean((d["y_test"] - d["y_train"].mean()) ** 2)))
    rows.append({"model": "mean (no model)", "test_rmse_m": baseline})
    return rows
