"""``densenet export --check``: an export, loaded in a fresh process by its own runtime, against the
float64 numpy oracle on seeded inputs at two batch sizes, under the float32 error model of
docs/parity.md (the ``inference`` check: ``C * 2**-24`` of the logits' scale). Two exports of the
same weights must also agree with each other within twice that bound.

Run as ``python -m common.deploy.check DIR WEIGHTS [--threads N]``: prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DenseNetConfig
from common.errors import DenseNetError, Failed
from common.oracle import reference
from common.process import lifeline
from common.verify.parity import bound

__all__ = ["BATCH_SIZES", "check", "check_in_child", "seeded_images"]

BATCH_SIZES = (1, 5)  # neither is the batch the exporters traced with (2)
CHECK = "inference"
CHILD_TIMEOUT_S = 600


def seeded_images(config: DenseNetConfig, image_size: int, batch: int, seed: int = 0) -> np.ndarray:
    """The check's NCHW float32 inputs: standard normal, seeded by ``(seed, batch)``."""
    rng = np.random.default_rng([seed, batch])
    return rng.standard_normal((batch, config.in_channels, image_size, image_size)).astype(np.float32)


def relative_error(Y: np.ndarray, reference_Y: np.ndarray) -> float:
    """``max |Y - reference| / max |reference|``: the error model's measure (docs/parity.md)."""
    return float(np.max(np.abs(Y.astype(np.float64) - reference_Y)) / np.max(np.abs(reference_Y)))


def check(
    directory: str | os.PathLike, weights: dict[str, np.ndarray], threads: int, speed_batch: int = 0
) -> dict[str, Any]:
    """Load the export in ``directory`` and compare it with the oracle; the report as a dict. With
    ``speed_batch``, also the median speed of 5 timed runs on a batch of that size (after 2 untimed)."""
    from common.deploy.export import read_manifest
    from common.deploy.runtime import runner

    manifest = read_manifest(directory)
    config = DenseNetConfig.from_dict(manifest["config"])
    image_size = manifest["input"]["shape"][2 if manifest["layout"] == "NCHW" else 1]
    start = time.perf_counter()
    run = runner(directory, manifest, threads)
    load_seconds = time.perf_counter() - start
    limit = bound(CHECK, "float32")
    cases = []
    for batch in BATCH_SIZES:
        X = seeded_images(config, image_size, batch)
        expected = reference.forward(config, weights, X, dtype=np.float64)[0]
        Y = run(X)
        if Y.shape != expected.shape:
            raise Failed(f"{directory}: logits of shape {Y.shape} for a batch of {batch}, expected {expected.shape}")
        error = relative_error(Y, expected)
        cases.append({"batch": batch, "error": error, "bound": limit, "margin": limit / error if error else None})
    speed = _speed(run, config, image_size, speed_batch) if speed_batch else None
    return {
        "directory": str(directory),
        "images_per_s": speed,
        "speed_batch": speed_batch or None,
        "backend": manifest["backend"],
        "format": manifest["format"],
        "exporter": manifest["exporter"],
        "load_seconds": round(load_seconds, 3),
        "cases": cases,
        "ok": all(c["error"] <= c["bound"] for c in cases),
    }


def _speed(run, config: DenseNetConfig, image_size: int, batch: int) -> float:
    X = seeded_images(config, image_size, batch, seed=1)
    for _ in range(2):
        run(X)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run(X)
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def check_in_child(
    directory: str | os.PathLike, weights_path: str | os.PathLike, threads: int, speed_batch: int = 0
) -> dict[str, Any]:
    """:func:`check` in a fresh Python process (nothing of the exporting framework loaded)."""
    command = [
        sys.executable,
        "-m",
        "common.deploy.check",
        str(directory),
        str(weights_path),
        "--threads",
        str(threads),
        "--speed-batch",
        str(speed_batch),
    ]
    try:
        done = lifeline.run(command, os.environ, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Failed(f"checking {directory} took more than {CHILD_TIMEOUT_S} s in its child process") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode not in (0, 1) or not lines:  # 1: it ran, and an error is above its bound
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Failed(f"checking {directory} failed in its child process (exit {done.returncode}): {tail}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.deploy.check", description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("weights", help="the canonical weight file the export was made from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed-batch", type=int, default=0, help="also time runs on a batch of this size")
    args = parser.parse_args(argv)
    from common.process import threads

    lifeline.guard_parent()  # dies with the command that started it
    from common.weights.canonical import load_canonical

    threads.apply(args.threads)  # before the runtime loads

    try:
        weights = load_canonical(args.weights).weights
        report = check(Path(args.directory), weights, args.threads, args.speed_batch)
    except DenseNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
