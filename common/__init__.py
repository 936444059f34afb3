"""Framework-neutral core of densenet-suite: configuration, channel plan, backend registry,
layout conversion, canonical weights and the harness. Importing it imports no framework."""

from common.config import D2L, DenseNetConfig, NetworkPlan, Stage, canonical_spec, min_input_size, plan
from common.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    DenseNetError,
    InputError,
    WeightFileError,
)
from common.registry import BACKENDS, available, load_backend

__all__ = [
    "BACKENDS",
    "D2L",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "DenseNetConfig",
    "DenseNetError",
    "InputError",
    "NetworkPlan",
    "Stage",
    "WeightFileError",
    "available",
    "canonical_spec",
    "load_backend",
    "min_input_size",
    "plan",
]
