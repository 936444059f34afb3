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


# The command that installs torchvision beside the pinned torch (its model code is pure Python).
TORCHVISION_INSTALL = "pip install -c constraints.txt -e '.[peers]'"


def torchvision_densenet(config: pytest.Config):
    """torchvision's own ``torchvision.models.densenet`` module, for checking the converters
    against the peer's real model code.

    PyPI's torchvision is built against the CUDA torch; beside the CPU build pinned here its
    compiled extension cannot load (``libc10_cuda.so``) and ``import torchvision`` fails with
    ``operator torchvision::nms does not exist``. The DenseNet needs none of the extension, so
    when the package does not import, its model file is loaded by itself: ``torchvision`` and
    ``torchvision.models`` stand in as bare packages over the installed files, without running
    their ``__init__`` (which loads the extension and every other model). The stand-ins are
    taken out of ``sys.modules`` again; the loaded module keeps what it imported.

    Missing torchvision skips, saying how to install it, unless ``--backends all`` asks for
    everything (CI), where it fails.
    """
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        message = f"torchvision is not installed ({TORCHVISION_INSTALL} installs it)"
        if config.getoption("--backends").strip() == "all":
            pytest.fail(message)
        pytest.skip(message)
    try:
        return importlib.import_module("torchvision.models.densenet")
    except (RuntimeError, OSError, ImportError):
        pass
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    for k in saved:
        del sys.modules[k]
    root = spec.submodule_search_locations[0]
    try:
        for name, path in (("torchvision", root), ("torchvision.models", f"{root}/models")):
            package = types.ModuleType(name)
            package.__path__ = [path]
            package.__package__ = name
            sys.modules[name] = package
        return importlib.import_module("torchvision.models.densenet")
    finally:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules.update(saved)
