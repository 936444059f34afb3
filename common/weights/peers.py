"""Weight converters between the canonical format and the peer DenseNets people deploy.

- torchvision (``torchvision.models.densenet121`` ...): state-dict names, OIHW, BN epsilon 1e-5.
- Keras Applications (``keras.applications.DenseNet121`` ...): ``layer/variable`` names, HWIO and
  (in, out) kernels, BN epsilon 1.001e-5.
- the MXNet Gluon model zoo (``mxnet.gluon.model_zoo.vision.densenet121``): auto-generated
  parameter names in forward order, OIHW, BN epsilon 1e-5.

Every function works on plain ``{name: numpy array}`` dicts and imports no framework. Importing
checks every tensor and reports every missing, unexpected and mis-shaped one at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.arch import canonical_spec
from common.config import CONFIGS, DenseNetConfig
from common.errors import WeightFileError
from common.layout import param_from_native, param_to_native
from common.weights.canonical import check_weights, format_problems, name_list
from common.weights.safetensors_io import read_weights

FORMATS = ("torchvision", "keras", "gluon")

# Keras Applications builds every BatchNormalization with epsilon 1.001e-5; our networks use
# 1e-5. In inference BatchNorm divides by sqrt(running_var + eps), so moving the difference into
# the running variance makes the two compute exactly the same function.
KERAS_EPS_SHIFT = 1.001e-5 - 1e-5

_BN = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}
_KERAS_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_GLUON_BN = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}


# Each peer's name for every canonical layer: fixed layers, then patterns for the dense layers
# (by block, layer and part) and the transitions (by index). Keras counts blocks from 2.
_TORCHVISION = {
    "stem.conv": "features.conv0",
    "stem.bn": "features.norm0",
    "head.bn": "features.norm5",
    "head.fc": "classifier",
    "dense": "features.denseblock{block}.denselayer{layer}.{part}",
    "parts": {("bn", True): "norm1", ("conv", True): "conv1", ("bn", False): "norm2", ("conv", False): "conv2"},
    "transition": "features.transition{block}.{part}",
    "transition_parts": {"bn": "norm", "conv": "conv"},
    "block_offset": 0,
}
_KERAS = {
    "stem.conv": "conv1_conv",
    "stem.bn": "conv1_bn",
    "head.bn": "bn",
    "head.fc": "predictions",
    "dense": "conv{block}_block{layer}_{part}",
    "parts": {("bn", True): "0_bn", ("conv", True): "1_conv", ("bn", False): "1_bn", ("conv", False): "2_conv"},
    "transition": "pool{block}_{part}",
    "transition_parts": {"bn": "bn", "conv": "conv"},
    "block_offset": 1,
}


def _peer_layer(prefix: str, table: dict) -> str:
    """Canonical layer prefix -> the peer's layer name."""
    if prefix in table:
        return table[prefix]
    m = re.fullmatch(r"dense(\d+)\.conv(\d+)\.(bottleneck\.)?(bn|conv)", prefix)
    if m:
        block, layer, bottleneck, kind = m.groups()
        part = table["parts"][kind, bool(bottleneck)]
        return table["dense"].format(block=int(block) + table["block_offset"], layer=layer, part=part)
    block, kind = re.fullmatch(r"transition(\d+)\.(bn|conv)", prefix).groups()
    return table["transition"].format(block=int(block) + table["block_offset"], part=table["transition_parts"][kind])


def _require_bc(config: DenseNetConfig, peer: str) -> None:
    if config.bn_size is None:
        raise WeightFileError(
            f"{peer}'s DenseNet has a 1x1 bottleneck in every dense layer; this configuration has none "
            "(bn_size=None): use a DenseNet-BC configuration such as densenet121"
        )


def torchvision_names(config: DenseNetConfig) -> dict[str, str]:
    """Canonical name -> torchvision state-dict key."""
    _require_bc(config, "torchvision")
    return {
        name: f"{_peer_layer(name.rsplit('.', 1)[0], _TORCHVISION)}.{name.rsplit('.', 1)[1]}"
        for name in canonical_spec(config)
    }


def keras_names(config: DenseNetConfig) -> dict[str, str]:
    """Canonical name -> Keras Applications ``layer/variable``."""
    _require_bc(config, "Keras Applications")
    out = {}
    for name in canonical_spec(config):
        prefix, leaf = name.rsplit(".", 1)
        variable = _KERAS_BN[leaf] if prefix.endswith("bn") else {"weight": "kernel", "bias": "bias"}[leaf]
        out[name] = f"{_peer_layer(prefix, _KERAS)}/{variable}"
    return out


def _import(
    peer: str,
    config: DenseNetConfig,
    tensors: Mapping[str, np.ndarray],
    names: Mapping[str, str],
    ignore: re.Pattern[str] | None = None,
) -> dict[str, np.ndarray]:
    """Rename ``tensors`` to canonical names, reporting every problem at once."""
    spec = canonical_spec(config)
    peer_to_canonical = {v: k for k, v in names.items()}
    problems = []
    missing = [v for v in names.values() if v not in tensors]
    unexpected = [k for k in tensors if k not in peer_to_canonical and not (ignore and ignore.search(k))]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {name_list(unexpected)}")
    out = {}
    for name, key in names.items():
        if key in tensors:
            value = np.asarray(tensors[key])
            if value.ndim != len(spec[name]):
                problems.append(f"{key}: expected {len(spec[name])} dimensions, got shape {value.shape}")
                continue
            out[name] = value
    if problems:
        raise WeightFileError(format_problems(f"{peer} weights do not fit {config.describe()}", problems))
    return out


def from_torchvision(state_dict: Mapping[str, np.ndarray], config: DenseNetConfig) -> dict[str, np.ndarray]:
    """A torchvision DenseNet state dict (numpy values) in canonical names; ``num_batches_tracked``
    is dropped. Older checkpoints' ``norm.1``-style keys are accepted too."""
    legacy = re.compile(r"\.(norm|relu|conv)\.(\d)\.")
    state_dict = {legacy.sub(r".\1\2.", k): v for k, v in state_dict.items()}
    out = _import("torchvision", config, state_dict, torchvision_names(config), re.compile(r"num_batches_tracked$"))
    return _checked(out, config, "torchvision")


def to_torchvision(weights: Mapping[str, np.ndarray], config: DenseNetConfig) -> dict[str, np.ndarray]:
    """Canonical weights as a torchvision state dict (with ``num_batches_tracked`` = 0)."""
    check_weights(canonical_spec(config), weights)
    out: dict[str, np.ndarray] = {}
    for name, key in torchvision_names(config).items():
        out[key] = np.asarray(weights[name], np.float32)
        if key.endswith("running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


def from_keras(layers: Mapping[str, np.ndarray], config: DenseNetConfig) -> dict[str, np.ndarray]:
    """Keras Applications weights, ``{"<layer name>/<variable name>": array}`` as
    :func:`keras_names` spells them (``conv1_conv/kernel``, ``conv1_bn/gamma`` ...)."""
    out = _import("Keras Applications", config, layers, keras_names(config))
    out = {k: param_from_native(v, "NHWC") for k, v in out.items()}
    out = {k: v + KERAS_EPS_SHIFT if k.endswith("running_var") else v for k, v in out.items()}
    return _checked(out, config, "Keras Applications")


def to_keras(weights: Mapping[str, np.ndarray], config: DenseNetConfig) -> dict[str, np.ndarray]:
    check_weights(canonical_spec(config), weights)
    out = {}
    for name, key in keras_names(config).items():
        value = np.asarray(weights[name], np.float64)
        if name.endswith("running_var"):
            value = value - KERAS_EPS_SHIFT
        out[key] = param_to_native(value, "NHWC").astype(np.float32)
    return out


def gluon_names(config: DenseNetConfig, peer_names: list[str]) -> dict[str, str]:
    """Canonical name -> Gluon parameter name, pairing both in forward order.

    Gluon names parameters by block counters (``densenet0_stage1_conv3_weight``), so the model
    zoo's own ``collect_params()`` order, which is its forward order, is the only reliable key.
    """
    _require_bc(config, "the Gluon model zoo")
    spec = list(canonical_spec(config))
    problems = []
    if len(peer_names) != len(spec):
        problems.append(f"expected {len(spec)} parameters, got {len(peer_names)}")
    out = {}
    for name, peer in zip(spec, peer_names):
        prefix, leaf = name.rsplit(".", 1)
        suffix = _GLUON_BN[leaf] if prefix.endswith("bn") else leaf
        if not peer.endswith("_" + suffix):
            problems.append(f"{peer} does not look like {name} (expected a name ending in _{suffix})")
        out[name] = peer
    if problems:
        raise WeightFileError("Gluon parameters do not follow the network's order:\n  " + "\n  ".join(problems[:20]))
    return out


def from_gluon(params: Mapping[str, np.ndarray], config: DenseNetConfig) -> dict[str, np.ndarray]:
    """Gluon model-zoo parameters (``{name: array}`` in ``collect_params()`` order)."""
    out = _import("Gluon model zoo", config, params, gluon_names(config, list(params)))
    return _checked(out, config, "Gluon model zoo")


def to_gluon(weights: Mapping[str, np.ndarray], config: DenseNetConfig, peer_names: list[str]) -> dict[str, np.ndarray]:
    """Canonical weights under a Gluon network's parameter names (its ``collect_params()`` keys)."""
    check_weights(canonical_spec(config), weights)
    return {peer: np.asarray(weights[name], np.float32) for name, peer in gluon_names(config, peer_names).items()}


def _checked(weights: dict[str, np.ndarray], config: DenseNetConfig, peer: str) -> dict[str, np.ndarray]:
    spec = canonical_spec(config)
    out = {k: np.asarray(weights[k], np.float32) for k in spec}
    check_weights(spec, out, source=f"{peer} weights (converted)")
    return out


def _infer_gluon(names: list[str], shapes: Mapping[str, tuple[int, ...]]) -> DenseNetConfig:
    # Gluon names are block counters, so the shapes in forward order are what tells the network:
    # a model-zoo DenseNet's canonical shapes, with the file's own classes and image channels.
    ordered = [tuple(shapes[n]) for n in names]
    if not ordered or len(ordered[0]) != 4 or len(ordered[-1]) != 1:
        raise WeightFileError("these do not look like Gluon DenseNet parameters; pass --config")
    in_channels, num_classes = ordered[0][1], ordered[-1][0]
    for config in CONFIGS.values():
        if config.bn_size is None:
            continue
        candidate = config.replace(num_classes=num_classes, in_channels=in_channels)
        if [tuple(shape) for shape in canonical_spec(candidate).values()] == ordered:
            return config if candidate == config else candidate
    zoo = ", ".join(n for n, c in CONFIGS.items() if c.bn_size is not None)
    raise WeightFileError(
        f"these {len(ordered)} Gluon parameters are none of {zoo} in their shapes; pass --config and the "
        "network options (--num-classes ...)"
    )


def infer_config(names: list[str], shapes: Mapping[str, tuple[int, ...]], fmt: str) -> DenseNetConfig:
    """The DenseNet-BC configuration a torchvision, Keras Applications or Gluon weight set describes
    (Gluon's: one of the named family, in the file's classes and channels)."""
    if fmt == "gluon":
        return _infer_gluon(names, shapes)
    if fmt == "torchvision":
        layer = re.compile(r"features\.denseblock(\d+)\.denselayer(\d+)\.")
        stem, conv1, conv2, fc, trans = (
            "features.conv0.weight",
            "features.denseblock1.denselayer1.conv1.weight",
            "features.denseblock1.denselayer1.conv2.weight",
            "classifier.weight",
            "features.transition1.conv.weight",
        )
        out_in = lambda key: shapes[key][:2]  # noqa: E731  (OIHW / (out, in))
    elif fmt == "keras":
        layer = re.compile(r"conv(\d+)_block(\d+)_")
        stem, conv1, conv2, fc, trans = (
            "conv1_conv/kernel",
            "conv2_block1_1_conv/kernel",
            "conv2_block1_2_conv/kernel",
            "predictions/kernel",
            "pool2_conv/kernel",
        )
        out_in = lambda key: tuple(reversed(shapes[key][-2:]))  # noqa: E731  (HWIO / (in, out))
    else:
        raise WeightFileError(f"cannot infer a configuration from {fmt} names; pass --config")
    try:
        counts: dict[int, int] = {}
        for name in names:
            if m := layer.match(name):
                counts[int(m[1])] = max(counts.get(int(m[1]), 0), int(m[2]))
        first = min(counts)
        arch = tuple(counts[b] for b in range(first, first + len(counts)))
        num_channels, in_channels = out_in(stem)
        width, _ = out_in(conv1)
        growth, _ = out_in(conv2)
        num_classes, _ = out_in(fc)
        compression = 0.5
        if len(arch) > 1:
            t_out, t_in = out_in(trans)
            compression = t_out / t_in
        config = DenseNetConfig(
            num_channels=num_channels,
            growth_rate=growth,
            arch=arch,
            num_classes=num_classes,
            in_channels=in_channels,
            bn_size=width // growth,
            compression=compression,
            conv_bias=False,
        )
    except (KeyError, ValueError) as exc:
        raise WeightFileError(f"these do not look like {fmt} DenseNet weights ({exc}); pass --config") from None
    named = next((n for n, c in CONFIGS.items() if c == config), None)
    return CONFIGS[named] if named else config


__all__ = [
    "FORMATS",
    "KERAS_EPS_SHIFT",
    "from_gluon",
    "from_keras",
    "from_torchvision",
    "gluon_names",
    "infer_config",
    "keras_names",
    "load_peer",
    "to_gluon",
    "to_keras",
    "to_torchvision",
    "torchvision_names",
]


def load_peer(
    path: str | Path, fmt: str, config: DenseNetConfig | None = None
) -> tuple[DenseNetConfig, dict[str, np.ndarray]]:
    """A peer's weights saved as ``.safetensors`` or ``.npz`` under the peer's own names, as
    canonical tensors, with the configuration they show (``infer_config``) or ``config``."""
    if fmt not in FORMATS:
        raise WeightFileError(f"unknown peer format {fmt!r}; expected one of {', '.join(FORMATS)}")
    tensors, _ = read_weights(path)
    if config is None:
        config = infer_config(list(tensors), {k: v.shape for k, v in tensors.items()}, fmt)
    convert = {"torchvision": from_torchvision, "keras": from_keras, "gluon": from_gluon}[fmt]
    return config, convert(tensors, config)
