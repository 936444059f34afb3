"""The canonical weight format: names and shapes from ``common.arch.canonical_spec``.

A canonical weight file is a ``.safetensors`` or ``.npz`` file (read and written without pickle by
:mod:`common.weights.safetensors_io`) holding every tensor of :func:`common.arch.canonical_spec` as
float32, in that order, with string metadata:

``format``          ``"densenet-suite/canonical"``
``format_version``  ``"1"``
``config``          JSON of :meth:`DenseNetConfig.to_dict`, from which the file rebuilds its network
``source``          who produced the tensors: a backend name, ``"numpy-init"``, ...
``running_var``     how training fed the running variances: ``"unbiased"`` (n/(n-1), the canonical
                    convention, whichever framework trained) or ``"biased"`` (files converted from
                    a framework that feeds the biased batch variance, e.g. Keras or Gluon weights)

Nothing here imports a framework.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common.arch import BN_LEAVES, canonical_spec, is_state
from common.config import DenseNetConfig
from common.errors import ConfigError, WeightFileError
from common.weights.safetensors_io import PathLike, read_weights, write_weights

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MOMENTUM_BUFFER",
    "CanonicalFile",
    "check_weights",
    "config_differences",
    "format_problems",
    "infer_canonical_config",
    "init_canonical",
    "load_canonical",
    "load_weights",
    "name_list",
    "save_weights",
    "weight_problems",
]

FORMAT = "densenet-suite/canonical"
FORMAT_VERSION = "1"
DTYPE = np.dtype(np.float32)

# The canonical running-variance convention: during training every BatchNorm feeds its running
# variance the unbiased batch variance n/(n-1), as PyTorch does (and torchvision's weights were
# trained). MXNet, Keras and Flax feed the biased one; their adapters re-express each training
# step's update (common.adapter.Adapter.canonical_running_stat), so a file means the same thing
# whichever framework trained it. Inference reads the value as it is in every framework, so a
# file is never rescaled on import or export: that would change the function it computes.
RUNNING_VAR = "unbiased"
RUNNING_VAR_CONVENTIONS = ("unbiased", "biased")

# Fields that decide the names and shapes of the tensors; a file must state every one of them.
# (``drop_rate`` changes no tensor: it may be absent and is not compared.)
STRUCTURAL_FIELDS = (
    "num_channels",
    "growth_rate",
    "arch",
    "num_classes",
    "in_channels",
    "bn_size",
    "compression",
    "conv_bias",
)

# A training checkpoint also carries the optimiser's velocity of every parameter under
# "<param>.momentum_buffer" (PyTorch's state key; canonical layout; common.training.optim.state_spec).
MOMENTUM_BUFFER = ".momentum_buffer"

_TORCH_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# A message lists at most this many problems, and this many names per line: a weight set for
# another network would otherwise print a line for each of its hundreds of tensors.
MAX_PROBLEMS = 10
MAX_NAMES = 8


def name_list(names: list[str]) -> str:
    """``a, b, c, ... (120 more)``: names for a message, the first few of them."""
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f", ... ({len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def weight_problems(spec: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray]) -> list[str]:
    """Every missing, unexpected, mis-shaped, non-float and non-finite tensor, one line each."""
    problems = []
    missing = [k for k in spec if k not in weights]
    unexpected = [k for k in weights if k not in spec]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {name_list(unexpected)}")
    for k, shape in spec.items():
        if k in weights:
            got = tuple(np.shape(weights[k]))
            if got != tuple(shape):
                problems.append(f"{k}: expected shape {tuple(shape)}, got {got}")
            elif not np.issubdtype(np.asarray(weights[k]).dtype, np.floating):
                problems.append(f"{k}: expected floating-point values, got {np.asarray(weights[k]).dtype}")
            elif not np.all(np.isfinite(weights[k])):
                problems.append(f"{k}: contains NaN or infinite values")
    return problems


def format_problems(title: str, problems: list[str], header: list[str] | None = None) -> str:
    """``title:`` and the problems, one per indented line, the first ``MAX_PROBLEMS`` of them."""
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problem(s)")
    return f"{title}:\n  " + "\n  ".join([*(header or []), *shown])


def _raise(source: str, problems: list[str], header: list[str] | None = None) -> None:
    if problems:
        raise WeightFileError(format_problems(f"{source} do not fit the network", problems, header))


def infer_canonical_config(shapes: Mapping[str, tuple[int, ...]]) -> DenseNetConfig | None:
    """The configuration canonical tensor names and shapes describe (None if they describe none)."""
    try:
        num_channels, in_channels = shapes["stem.conv.weight"][:2]
        arch = []
        while f"dense{len(arch) + 1}.conv1.conv.weight" in shapes:
            block = len(arch) + 1
            arch.append(sum(1 for k in shapes if re.fullmatch(rf"dense{block}\.conv\d+\.conv\.weight", k)))
        growth = shapes["dense1.conv1.conv.weight"][0]
        bottleneck = shapes.get("dense1.conv1.bottleneck.conv.weight")
        compression = 0.5
        if len(arch) > 1:
            kept, channels = shapes["transition1.conv.weight"][:2]
            compression = 0.5 if kept == channels // 2 else round(kept / channels, 3)
        return DenseNetConfig(
            num_channels=int(num_channels),
            growth_rate=int(growth),
            arch=tuple(arch),
            num_classes=int(shapes["head.fc.weight"][0]),
            in_channels=int(in_channels),
            bn_size=None if bottleneck is None else int(bottleneck[0]) // int(growth),
            compression=compression,
            conv_bias="stem.conv.bias" in shapes,
        )
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None


def check_weights(
    spec: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray], source: str = "weights"
) -> None:
    """Raise one :class:`WeightFileError` listing every missing, unexpected and mis-shaped tensor.

    Weights of another network are summarised: which network they hold, which was expected, how
    they differ, and the first few tensors.
    """
    problems = weight_problems(spec, weights)
    if not problems:
        return
    header = []
    found = infer_canonical_config({k: tuple(np.shape(v)) for k, v in weights.items()})
    expected = infer_canonical_config(spec)
    if found is not None and expected is not None and found != expected:
        header = [
            f"they hold DenseNet {found.describe()}",
            f"the network is DenseNet {expected.describe()}",
            *config_differences(found, expected, ("weights have", "network has")),
            "first problems:" if len(problems) > 1 else "the problem:",
        ]
    _raise(source, problems, header)


def init_canonical(config: DenseNetConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 canonical weights, drawn in ``canonical_spec`` order.

    Kernels are He-normal, biases uniform in +-1/sqrt(fan_in). BatchNorm parameters and running
    statistics are perturbed away from the identity so that gradient checks exercise them.
    """
    rng = np.random.default_rng(seed)
    spec = canonical_spec(config)
    weights: dict[str, np.ndarray] = {}
    for name, shape in spec.items():
        layer, leaf = name.rsplit(".", 2)[-2:]
        if layer == "bn":
            if leaf == "weight":
                value = 1 + rng.uniform(-0.1, 0.1, shape)
            elif leaf == "running_var":
                value = rng.uniform(0.5, 1.5, shape)
            elif leaf in BN_LEAVES:
                value = rng.uniform(-0.1, 0.1, shape)
            else:  # pragma: no cover - canonical_spec has only BN_LEAVES
                raise WeightFileError(f"unexpected BatchNorm tensor {name}")
        elif leaf == "weight":
            fan_in = math.prod(shape[1:])
            value = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
        else:
            fan_in = math.prod(spec[name[: -len("bias")] + "weight"][1:])
            bound = 1.0 / math.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        weights[name] = value.astype(np.float32)
    return weights


def config_differences(
    found: DenseNetConfig, expected: DenseNetConfig, words: tuple[str, str] = ("file has", "expected")
) -> list[str]:
    """``"field: file has X, expected Y"`` for every field that shapes the weights and differs."""
    out = []
    for name in STRUCTURAL_FIELDS:
        a, b = getattr(found, name), getattr(expected, name)
        if a != b:
            out.append(f"{name}: {words[0]} {_show(a)}, {words[1]} {_show(b)}")
    return out


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def save_weights(
    path: PathLike,
    weights: Mapping[str, np.ndarray],
    config: DenseNetConfig,
    *,
    source: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    running_var: str = RUNNING_VAR,
    optimizer_state: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write canonical ``weights`` for ``config`` to ``path`` (``.safetensors`` or ``.npz``), atomically.

    Every tensor is checked first (all problems in one :class:`WeightFileError`, nothing written),
    then stored as float32 in canonical order with the format metadata. ``source`` names where the
    tensors come from (a backend name, ``"numpy-init"``); ``"unknown"`` when not given.
    ``extra_metadata`` adds string entries (a training checkpoint's epoch and settings).
    ``running_var`` states how the running variances were accumulated (``RUNNING_VAR``).
    ``optimizer_state`` (a checkpoint's velocities, ``<param>.momentum_buffer``) is stored after
    the weights, as float32 too; :func:`load_canonical` returns it apart from the weights.
    """
    if running_var not in RUNNING_VAR_CONVENTIONS:
        raise ValueError(f"running_var must be one of {RUNNING_VAR_CONVENTIONS}, got {running_var!r}")
    if not isinstance(config, DenseNetConfig):
        raise TypeError(f"config must be a DenseNetConfig, got {type(config).__name__}")
    spec = canonical_spec(config)
    check_weights(spec, weights, source="weights to save")
    with np.errstate(over="ignore"):
        arrays = {k: np.ascontiguousarray(weights[k], dtype=DTYPE) for k in spec}
    # Finite float64 values can overflow float32; refuse rather than store infinities.
    check_weights(spec, arrays, source="weights to save (as float32)")
    if optimizer_state:
        state_spec = _optimizer_spec(spec, optimizer_state)
        _raise("optimizer state to save", weight_problems(state_spec, optimizer_state))
        with np.errstate(over="ignore"):
            state = {k: np.ascontiguousarray(optimizer_state[k], dtype=DTYPE) for k in state_spec}
        _raise("optimizer state to save (as float32)", weight_problems(state_spec, state))
        arrays.update(state)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "source": source if source is not None else "unknown",
        "running_var": running_var,
    }
    for key, value in (extra_metadata or {}).items():
        if key in metadata:
            raise ValueError(f"extra metadata may not replace {key!r}")
        metadata[key] = value
    write_weights(arrays, path, metadata)


class CanonicalFile(NamedTuple):
    """A canonical weight file's contents: its configuration, tensors (canonical order) and metadata,
    and the optimiser state a training checkpoint carries (empty otherwise)."""

    config: DenseNetConfig
    weights: dict[str, np.ndarray]
    metadata: dict[str, str]
    optimizer_state: dict[str, np.ndarray] = {}


def _optimizer_spec(spec: Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The names and shapes ``state`` must have: a velocity for every parameter it has one for,
    all of them or none (``common.training.optim.state_spec``)."""
    expected = {k + MOMENTUM_BUFFER: shape for k, shape in spec.items() if not is_state(k)}
    return expected if state else {}


def load_weights(
    path: PathLike, expected_config: DenseNetConfig | None = None
) -> tuple[DenseNetConfig, dict[str, np.ndarray]]:
    """Read a canonical weight file: ``(its configuration, float32 tensors in canonical order)``.

    Never unpickles. Refuses, with a :class:`WeightFileError` naming the file, anything that is
    not a canonical file, a configuration other than ``expected_config`` (listing the fields that
    differ) and tensors that do not fit the configuration (all problems listed at once).
    """
    found = load_canonical(path, expected_config)
    return found.config, found.weights


def load_canonical(path: PathLike, expected_config: DenseNetConfig | None = None) -> CanonicalFile:
    """:func:`load_weights`, also returning the file's metadata."""
    path = Path(path)
    tensors, metadata = read_weights(path)
    fmt = metadata.get("format")
    if fmt != FORMAT:
        what = "it has no 'format' metadata" if fmt is None else f"its metadata says format {fmt!r}"
        message = f"{path}: not a densenet-suite canonical weight file ({what}, expected {FORMAT!r})"
        example = _torch_like_name(tensors)
        if example is not None:
            message += (
                f"; its tensor names (e.g. {example!r}) look like a PyTorch state dict: for a torchvision "
                "DenseNet's, use `densenet convert --from-format torchvision`"
            )
        raise WeightFileError(
            message + "; write canonical files with `densenet init` or common.weights.canonical.save_weights"
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightFileError(
            f"{path}: canonical format version {version!r} is not supported; this densenet-suite reads "
            f"version {FORMAT_VERSION!r}"
        )
    config = _config_from_metadata(metadata, path)
    if expected_config is not None:
        differences = config_differences(config, expected_config)
        if differences:
            raise WeightFileError(f"{path}: weights are for a different network:\n  " + "\n  ".join(differences))
    spec = canonical_spec(config)
    optimizer_state = {k: v for k, v in tensors.items() if k.endswith(MOMENTUM_BUFFER)}
    tensors = {k: v for k, v in tensors.items() if k not in optimizer_state}
    problems = weight_problems(spec, tensors) + weight_problems(_optimizer_spec(spec, optimizer_state), optimizer_state)
    for k in spec:
        # Shape, float and finiteness problems are already listed; the format stores float32 only.
        if k in tensors and tuple(tensors[k].shape) == spec[k] and tensors[k].dtype.kind == "f":
            if tensors[k].dtype != DTYPE:
                problems.append(f"{k}: expected float32, got {tensors[k].dtype}")
        # A variance below zero makes sqrt(var + eps) NaN in every framework (zero is a dead channel).
        if k.endswith("running_var") and k in tensors and tensors[k].dtype.kind == "f" and np.any(tensors[k] < 0):
            problems.append(f"{k}: running variance must not be negative, found {float(np.min(tensors[k])):g}")
    convention = metadata.get("running_var")
    if convention not in RUNNING_VAR_CONVENTIONS:
        stated = "has no running_var entry" if convention is None else f"running_var is {convention!r}"
        problems.append(f"metadata {stated}, expected one of {', '.join(RUNNING_VAR_CONVENTIONS)}")
    _raise(f"{path}: tensors", problems)
    return CanonicalFile(config, {k: tensors[k] for k in spec}, dict(metadata), optimizer_state)


def _config_from_metadata(metadata: Mapping[str, str], path: Path) -> DenseNetConfig:
    text = metadata.get("config")
    if text is None:
        raise WeightFileError(f"{path}: metadata has no 'config' entry; cannot tell which network the weights are for")
    try:
        d = json.loads(text)
    except ValueError as e:
        raise WeightFileError(f"{path}: metadata 'config' is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise WeightFileError(f"{path}: metadata 'config' must be a JSON object, got {type(d).__name__}")
    missing = [k for k in STRUCTURAL_FIELDS if k not in d]
    if missing:
        raise WeightFileError(f"{path}: metadata 'config' lacks {', '.join(missing)}")
    try:
        return DenseNetConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise WeightFileError(f"{path}: metadata 'config' is not a valid configuration: {e}") from None


def _torch_like_name(tensors: Mapping[str, np.ndarray]) -> str | None:
    """A tensor name that looks like ``torch.nn.Module.state_dict`` (``net.0.1.running_mean``), if any."""
    for name in tensors:
        parts = name.split(".")
        if parts[-1] == "num_batches_tracked" or (parts[-1] in _TORCH_LEAVES and any(p.isdigit() for p in parts[:-1])):
            return name
    return None
