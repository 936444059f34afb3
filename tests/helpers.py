"""Helpers the test modules import (fixtures stay in conftest.py, which pytest loads itself)."""

from __future__ import annotations

import numpy as np
import pytest

from common.cli import main
from common.errors import BackendUnavailable
from common.registry import BACKENDS, available, canonical_name, load_backend


def required_backends(config: pytest.Config) -> set[str]:
    """Backends that ``--backends`` (or ``DENSENET_BACKENDS``) says must load."""
    value = config.getoption("--backends").strip()
    if not value:
        return set()
    if value == "all":
        return set(BACKENDS)
    return {canonical_name(v) for v in value.split(",") if v.strip()}


def participating_backends(config: pytest.Config) -> list[str]:
    """Every backend that loads, plus every required one (which then fails where it is used)."""
    required = required_backends(config)
    return [s.name for s in available() if s.available or s.name in required]


def get_adapter(name: str, config: pytest.Config):
    """The adapter of ``name``; a failure if it is required and cannot load, else a skip."""
    try:
        return load_backend(name)
    except BackendUnavailable as exc:
        if name in required_backends(config):
            pytest.fail(f"required backend {name!r} cannot load: {exc}")
        pytest.skip(str(exc))


def cached_model(cache: dict, adapter, config):
    """``adapter.build(config, seed=0)``, shared through ``model_cache`` (building costs seconds)."""
    key = (adapter.name, config)
    if key not in cache:
        cache[key] = adapter.build(config, seed=0)
    return cache[key]


def images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 images of ``shape``."""
    return rng.standard_normal(shape).astype(np.float32)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """``densenet ARGV`` in this process: (exit status, stdout, stderr); usage errors included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
