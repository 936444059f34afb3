"""Backend parametrisation shared by every test (helpers that tests import: tests/helpers.py).

Each backend is a pytest parameter carrying its own marker (``-m torch``). ``--backends``
(or ``DENSENET_BACKENDS``) names backends that must load: one that cannot is a failure, never a
skip. Backends not named are skipped, with the reason, when their framework is missing.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from common.registry import BACKENDS
from tests.helpers import get_adapter


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=os.environ.get("DENSENET_BACKENDS", ""),
        help="comma-separated backends that must load (or 'all'); others are skipped if missing",
    )


BACKEND_PARAMS = [pytest.param(name, marks=getattr(pytest.mark, name), id=name) for name in BACKENDS]


@pytest.fixture(params=BACKEND_PARAMS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def adapter(backend_name: str, request: pytest.FixtureRequest):
    """The adapter of the parametrised backend (fails if required and unavailable)."""
    return get_adapter(backend_name, request.config)


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
