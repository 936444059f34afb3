"""Backends by name, imported only when asked for (importing ``common`` imports no framework)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from common.adapter import Adapter
from common.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:  # for the annotation only: common.distributed imports this module
    from common.distributed.engine import Engine


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives and how to install it, known without importing it."""

    package: str
    """The backend's package (``densenet_torch``); its adapter is in ``<package>.adapter``."""
    adapter_class: str
    """Name of the :class:`Adapter` subclass in that module."""
    framework: str
    """The framework's name as people write it (``"PyTorch"``)."""
    extra: str
    """The pip extra that installs the framework (``pip install 'densenet-suite[<extra>]'``)."""
    launch: str = "launch"
    """The module of the package that says how the backend's processes are started (its
    :class:`Launch`, ``LAUNCH``), read without the framework: :func:`launch_spec`."""


BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry("densenet_torch", "TorchAdapter", "PyTorch", "torch"),
    "mxnet": BackendEntry("densenet_mxnet", "MXNetAdapter", "MXNet Gluon", "mxnet"),
    "jax": BackendEntry("densenet_jax", "JaxAdapter", "JAX/Flax", "jax"),
    "tf": BackendEntry("densenet_tf", "TFAdapter", "TensorFlow/Keras", "tf"),
}
ALIASES = {
    "pytorch": "torch",
    "gluon": "mxnet",
    "flax": "jax",
    "tensorflow": "tf",
    "keras": "tf",
}

_loaded: dict[str, Adapter[Any]] = {}

# TensorFlow's C++ core prints start-up notes (oneDNN, CPU features) on stderr unless told
# otherwise before its first import; they would drown the CLI's tables. Set here and nowhere
# else: the CLI and load_backend run this line before any framework is imported, whereas
# densenet_tf can come too late (another framework's optional imports may load TensorFlow first).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Launch:
    """How a backend's processes are started, known without importing its framework: what
    ``common`` asks of a backend before any of its code runs (the CLI choosing a ``malloc``,
    the bench preparing a case's process, the local launcher starting workers), so that no
    module of ``common`` but this one knows a backend by name.

    Each backend package defines one as ``LAUNCH`` in its ``launch.py``, a module that imports
    no framework; :func:`launch_spec` reads it without importing the package (whose
    ``__init__`` imports the framework). The defaults fit a backend that needs nothing special.
    """

    malloc: str = "system"
    """The ``malloc`` its training and benchmark processes run on (``common.process.allocator``):
    ``tcmalloc`` where the framework takes every CPU tensor from ``malloc``, else ``system``."""
    engine: Engine | None = None
    """Its distributed engine's recipe for local jobs (``common.distributed.engine``), or None."""

    def eager_env(self, base: Mapping[str, str], memory_efficient: bool) -> dict[str, str]:
        """``base`` for a process that trains this backend's network eagerly (memory-efficient
        or not): what the framework must read from its environment before it is imported."""
        return dict(base)

    def runtime_record(self) -> dict[str, str]:
        """What a result measured in this process records of the framework's runtime, beyond
        ``malloc`` (MXNet: the engine it ran on)."""
        return {}


def canonical_name(name: str) -> str:
    """``"tensorflow"`` -> ``"tf"``; unknown names raise :class:`BackendError`."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} (aliases: {', '.join(sorted(ALIASES))})"
        )
    return key


def load_backend(name: str) -> Adapter[Any]:
    """The adapter of one backend; :class:`BackendUnavailable` says why it cannot load."""
    key = canonical_name(name)
    if key not in _loaded:
        entry = BACKENDS[key]
        try:
            module = importlib.import_module(f"{entry.package}.adapter")
        except ImportError as exc:
            raise BackendUnavailable(
                f"backend {key!r} ({entry.framework}) cannot be imported: {exc}. "
                f"Install it with: pip install 'densenet-suite[{entry.extra}]'"
            ) from exc
        _loaded[key] = getattr(module, entry.adapter_class)()
    return _loaded[key]


def launch_spec(name: str) -> Launch:
    """How the backend's processes are started (``<package>/launch.py``'s ``LAUNCH``), read
    without importing the backend's package or framework."""
    key = canonical_name(name)
    entry = BACKENDS[key]
    module_name = f"{entry.package}.{entry.launch}"
    module = sys.modules.get(module_name)
    if module is None:
        if entry.package in sys.modules:  # the package (and its framework) is loaded: import as usual
            module = importlib.import_module(module_name)
        else:
            module = _load_alone(key, module_name)
    return module.LAUNCH


def _load_alone(key: str, module_name: str) -> ModuleType:
    """The module ``package.name`` from its file, without running the package's ``__init__``
    (which imports the framework). It is registered under its own name, so a later ordinary
    import (the backend's ``distributed.py`` in a worker) gets this same module."""
    package, _, name = module_name.rpartition(".")
    found = importlib.util.find_spec(package)  # a top-level name: found, not imported
    locations = list(found.submodule_search_locations or []) if found else []
    path = next((Path(d) / f"{name}.py" for d in locations if (Path(d) / f"{name}.py").is_file()), None)
    spec = importlib.util.spec_from_file_location(module_name, path) if path is not None else None
    if spec is None or spec.loader is None:
        raise BackendUnavailable(f"backend {key!r}: {module_name} is not installed (reinstall densenet-suite)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@dataclass(frozen=True)
class BackendStatus:
    name: str
    framework: str
    available: bool
    version: str | None
    reason: str | None
    checked: bool = True  # False: read from package metadata, the framework not imported (installed())


def available(names: list[str] | None = None) -> list[BackendStatus]:
    """Every backend (or the named ones) with its version, or the reason it cannot load."""
    out = []
    for name in names or list(BACKENDS):
        key = canonical_name(name)
        try:
            adapter = load_backend(key)
        except BackendUnavailable as exc:
            out.append(BackendStatus(key, BACKENDS[key].framework, False, None, str(exc)))
        else:
            out.append(BackendStatus(key, adapter.framework, True, adapter.version(), None))
    return out


# The distributions each backend needs, for installed(): alternatives in a tuple, the first
# one listed names the framework's version, the others are shown in parentheses.
_DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "torch": (("torch",),),
    "mxnet": (("mxnet",),),
    "jax": (("jax",), ("flax",), ("optax",)),
    "tf": (("tensorflow", "tensorflow-cpu"), ("keras",)),
}


def installed(names: list[str] | None = None) -> list[BackendStatus]:
    """Every backend (or the named ones) as its installed packages' metadata describe it, in
    milliseconds: no framework is imported, so a framework that is installed but broken shows up
    only in :func:`available`."""
    out = []
    for name in names or list(BACKENDS):
        key = canonical_name(name)
        if key not in _DISTRIBUTIONS:  # a backend this table does not know yet: ask the framework
            out += available([key])
            continue
        framework, extra = BACKENDS[key].framework, BACKENDS[key].extra
        versions, missing = [], []
        for alternatives in _DISTRIBUTIONS[key]:
            for dist in alternatives:
                try:
                    versions.append((dist, metadata.version(dist)))
                    break
                except metadata.PackageNotFoundError:
                    continue
            else:
                missing.append(" or ".join(alternatives))
        if missing:
            reason = f"{', '.join(missing)} not installed; pip install 'densenet-suite[{extra}]'"
            out.append(BackendStatus(key, framework, False, None, reason, checked=False))
            continue
        (_, first), *rest = versions
        version = first + (f" ({', '.join(f'{d} {v}' for d, v in rest)})" if rest else "")
        out.append(BackendStatus(key, framework, True, version, None, checked=False))
    return out
