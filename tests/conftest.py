"""Backend parametrisation shared by every test.

Each backend is a pytest parameter carrying its own marker (``-m torch``). ``--backends``
(or ``DENSENET_BACKENDS``) names backends that must load: one that cannot is a failure, never a
skip. Backends not named are skipped, with the reason, when their framework is missing.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from common.errors import BackendUnavailable
from common.registry import BACKENDS, canonical_name, load_backend


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=os.environ.get("DENSENET_BACKENDS", ""),
        help="comma-separated backends that must load (or 'all'); others are skipped if missing",
    )


def required_backends(config: pytest.Config) -> set[str]:
    value = config.getoption("--backends").strip()
    if not value:
        return set()
    if value == "all":
        return set(BACKENDS)
    return {canonical_name(v) for v in value.split(",") if v.strip()}


BACKEND_PARAMS = [pytest.param(name, marks=getattr(pytest.mark, name), id=name) for name in BACKENDS]


@pytest.fixture(params=BACKEND_PARAMS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def adapter(backend_name: str, request: pytest.FixtureRequest):
    """The adapter of the parametrised backend (fails if required and unavailable)."""
    return get_adapter(backend_name, request.config)


def get_adapter(name: str, config: pytest.Config):
    try:
        return load_backend(name)
    except BackendUnavailable as exc:
        if name in required_backends(config):
            pytest.fail(f"required backend {name!r} cannot load: {exc}")
        pytest.skip(str(exc))


@pytest.fixture
def native(backend_name: str, adapter):
    """The backend's package (``densenet_torch`` ...), loaded through the adapter's check."""
    import importlib

    return importlib.import_module(BACKENDS[backend_name].package)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def model_cache() -> dict:
    """Models that tests only read, built once per backend and configuration in a module."""
    return {}


def cached_model(cache: dict, adapter, config):
    """``adapter.build(config, seed=0)``, shared through ``model_cache`` (building costs seconds)."""
    key = (adapter.name, config)
    if key not in cache:
        cache[key] = adapter.build(config, seed=0)
    return cache[key]


def images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)
