"""The framework-neutral configuration and its arithmetic, checked against the book's numbers.

Nothing here imports a framework: every expectation comes from the reference
(/work/shared/reference/densenet.md, sections 1-3) or from arithmetic written out in the test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from common.arch import (
    canonical_spec,
    count_bn_stats,
    count_macs,
    count_params,
    is_state,
    min_input_size,
    plan,
    plan_channels,
    stage_names,
)
from common.config import D2L, DenseNetConfig
from common.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "mxnet", "jax", "flax", "tensorflow", "keras")

# The reference's stage table for a 1x96x96 image: (stage, channels, spatial side).
BOOK_TABLE = [
    ("stem", 64, 24),
    ("dense1", 192, 24),
    ("transition1", 96, 12),
    ("dense2", 224, 12),
    ("transition2", 112, 6),
    ("dense3", 240, 6),
    ("transition3", 120, 3),
    ("dense4", 248, 3),
    ("head", 10, 1),
]

TINY = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))


# ---------------------------------------------------------------------------------------------
# No framework behind `import common`


def test_import_common_imports_no_framework() -> None:
    code = (
        "import sys\n"
        "import common\n"
        "import common.adapter, common.checks, common.config, common.errors\n"
        "import common.layout, common.registry, common.weights.canonical\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing common pulled in: {result.stdout.strip()}"


# ---------------------------------------------------------------------------------------------
# The book's network


def test_defaults_are_the_books() -> None:
    config = DenseNetConfig()
    assert config == D2L
    assert config.num_channels == 64
    assert config.growth_rate == 32
    assert config.arch == (4, 4, 4, 4)
    assert isinstance(config.arch, tuple)
    assert config.num_classes == 10
    assert config.in_channels == 1  # Fashion-MNIST is grey


def test_d2l_plan_matches_reference_table() -> None:
    p = plan(D2L, 96)
    assert p.input_size == (96, 96)
    got = [(s.name, s.channels, s.height) for s in p.stages]
    assert got == BOOK_TABLE
    assert all(s.height == s.width for s in p.stages)
    assert [s.name for s in p.stages] == stage_names(D2L)
    shapes = p.shapes(2)
    assert shapes["stem"] == (2, 64, 24, 24)
    assert shapes["dense4"] == (2, 248, 3, 3)
    assert shapes["head"] == (2, 10)
    assert plan_channels(D2L) == [(name, c) for name, c, _ in BOOK_TABLE]


def test_d2l_counts_match_reference() -> None:
    assert count_params(D2L) == 758_226
    assert count_bn_stats(D2L) == 6_608
    assert plan(D2L, 96).num_params == 758_226
    # 129.1 M multiply-adds per 1x96x96 image, 58% of them in dense block 1.
    macs = count_macs(D2L, 96)
    assert abs(macs - 129.1e6) <= 0.1e6, macs
    assert plan(D2L, 96).macs == macs


def test_macs_dense_block_1_share() -> None:
    # Dense block 1 at 24x24: 4 convs 3x3 from 64, 96, 128, 160 channels to 32 each.
    dense1 = sum(c * 32 * 9 * 24 * 24 for c in (64, 96, 128, 160))
    share = dense1 / count_macs(D2L, 96)
    assert 0.57 <= share <= 0.59, share


def test_macs_by_hand_for_tiny_network() -> None:
    # 32x32 image: stem conv 16x16, pool 8x8, transition to 4x4.
    stem = 1 * 8 * 49 * 16 * 16
    dense1 = (8 * 4 + 12 * 4) * 9 * 8 * 8
    transition1 = 16 * 8 * 8 * 8
    dense2 = (8 * 4 + 12 * 4) * 9 * 4 * 4
    head = 16 * 10
    assert count_macs(TINY, 32) == stem + dense1 + transition1 + dense2 + head


# ---------------------------------------------------------------------------------------------
# Input sizes


def test_min_input_size_d2l_is_29() -> None:
    assert min_input_size(D2L) == 29
    p = plan(D2L, 29)
    assert [s.height for s in p.stages] == [8, 8, 4, 4, 2, 2, 1, 1, 1]


def test_28x28_is_refused_with_the_smallest_size() -> None:
    with pytest.raises(InputError) as info:
        plan(D2L, 28)
    message = str(info.value)
    assert "too small" in message
    assert "29x29" in message
    assert "28x28" in message


@pytest.mark.parametrize("size", [(28, 96), (96, 28), (1, 1)])
def test_too_small_in_either_dimension(size: tuple[int, int]) -> None:
    with pytest.raises(InputError, match="too small"):
        plan(D2L, size)


def test_input_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        plan(D2L, 28)


@pytest.mark.parametrize("bad", [0, -5, (96,), (96, 96, 96), (96.0, 96), "96", True, None])
def test_invalid_input_size_is_refused(bad) -> None:
    with pytest.raises(InputError):
        plan(D2L, bad)


def test_non_square_input() -> None:
    p = plan(D2L, (96, 64))
    assert p.input_size == (96, 64)
    # 96 -> 48 -> 24 -> 12 -> 6 -> 3 ; 64 -> 32 -> 16 -> 8 -> 4 -> 2
    expected = [(24, 16), (24, 16), (12, 8), (12, 8), (6, 4), (6, 4), (3, 2), (3, 2), (1, 1)]
    assert [(s.height, s.width) for s in p.stages] == expected
    assert p.shapes(3)["dense4"] == (3, 248, 3, 2)
    assert [s.channels for s in p.stages] == [c for _, c, _ in BOOK_TABLE]
    # Rectangular at the limit: one side 29 is enough.
    assert plan(D2L, (29, 200)).shapes(1)["dense4"] == (1, 248, 1, 6)
    # Multiply-adds depend only on the areas, so transposing the image changes nothing.
    assert count_macs(D2L, (96, 64)) == count_macs(D2L, (64, 96))
    assert count_macs(D2L, (96, 64)) < count_macs(D2L, 96)


def test_odd_sizes_floor_like_the_frameworks() -> None:
    # (s + 2*3 - 7) // 2 + 1, then (s + 2 - 3) // 2 + 1, then // 2 per transition.
    p = plan(DenseNetConfig(num_channels=16, growth_rate=8, arch=(3, 2, 1), num_classes=5, in_channels=3), (40, 36))
    assert [(s.height, s.width) for s in p.stages] == [(10, 9), (10, 9), (5, 4), (5, 4), (2, 2), (2, 2), (1, 1)]


@pytest.mark.parametrize(
    ("arch", "smallest"),
    [((1,), 1), ((1, 1), 5), ((1, 1, 1), 13), ((4, 4, 4, 4), 29), ((1, 1, 1, 1, 1), 61)],
)
def test_min_input_size_follows_the_number_of_blocks(arch: tuple[int, ...], smallest: int) -> None:
    config = DenseNetConfig(arch=arch)
    assert min_input_size(config) == smallest
    plan(config, smallest)
    if smallest > 1:
        with pytest.raises(InputError, match=f"{smallest}x{smallest}"):
            plan(config, smallest - 1)


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("arch", [(), [], "4444", b"44", 4, None])
def test_bad_arch_container(arch) -> None:
    with pytest.raises(ConfigError, match="arch"):
        DenseNetConfig(arch=arch)


@pytest.mark.parametrize("entry", [0, -1, 2.0, True, "4", None])
def test_bad_arch_entry(entry) -> None:
    with pytest.raises(ConfigError, match=r"arch\[1\]"):
        DenseNetConfig(arch=(4, entry, 4))


@pytest.mark.parametrize("field", ["growth_rate", "num_channels", "num_classes", "in_channels"])
@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, 2.5, "8", None])
def test_bad_positive_int_field(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        DenseNetConfig(**{field: value})


def test_fields_are_keyword_only() -> None:
    # The book's DenseNet(num_channels, growth_rate, arch, lr, num_classes) orders its arguments
    # differently, so a position would mean different things in the two.
    with pytest.raises(TypeError):
        DenseNetConfig(64, 32, (4, 4, 4, 4))


def test_lr_is_not_a_field() -> None:
    # Training's learning rate is TrainSettings.lr (`densenet train --lr`); the model never read it.
    assert "lr" not in {f.name for f in dataclasses.fields(DenseNetConfig)}
    with pytest.raises(TypeError):
        DenseNetConfig(lr=0.1)


def test_book_kwargs_are_every_field_but_in_channels() -> None:
    config = DenseNetConfig(num_channels=16, growth_rate=8, arch=[3, 2], num_classes=5, in_channels=3, bn_size=2)
    assert config.book_kwargs() == {
        "num_channels": 16,
        "growth_rate": 8,
        "arch": (3, 2),
        "num_classes": 5,
        "bn_size": 2,
        "compression": 0.5,
        "drop_rate": 0.0,
        "conv_bias": True,
    }
    assert DenseNetConfig(**config.book_kwargs(), in_channels=3) == config


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        DenseNetConfig(growth_rate=0)


def test_list_arch_becomes_tuple() -> None:
    config = DenseNetConfig(arch=[2, 3])
    assert config.arch == (2, 3)
    assert hash(config) == hash(DenseNetConfig(arch=(2, 3)))


def test_replace_validates() -> None:
    assert D2L.replace(growth_rate=12).growth_rate == 12
    with pytest.raises(ConfigError):
        D2L.replace(growth_rate=0)
    with pytest.raises(ConfigError):
        D2L.replace(arch=())


def test_halving_never_reaches_zero_channels_for_a_valid_config() -> None:
    # The smallest configuration there is: after a dense block there are at least 2 channels
    # (>= 1 in, >= 1 grown), so halving leaves at least 1.
    config = DenseNetConfig(num_channels=1, growth_rate=1, arch=(1,) * 8, num_classes=1)
    channels = dict(plan_channels(config))
    assert [channels[f"transition{i}"] for i in range(1, 8)] == [1] * 7
    assert [channels[f"dense{i}"] for i in range(1, 9)] == [2] * 8


def test_compressing_to_zero_channels_is_refused() -> None:
    # With the book's 0.5 a valid configuration never halves to zero (test above); a stronger
    # compression can: 2 channels * 0.1 -> 0.
    with pytest.raises(ConfigError, match="compress the channels to zero"):
        DenseNetConfig(num_channels=1, growth_rate=1, arch=(1, 1), compression=0.1)


# ---------------------------------------------------------------------------------------------
# Serialisation


@pytest.mark.parametrize(
    "config",
    [
        D2L,
        TINY,
        DenseNetConfig(num_channels=16, growth_rate=8, arch=(3, 2, 1), num_classes=5, in_channels=3, drop_rate=0.2),
    ],
)
def test_dict_round_trip(config: DenseNetConfig) -> None:
    d = config.to_dict()
    assert d == {
        "num_channels": config.num_channels,
        "growth_rate": config.growth_rate,
        "arch": list(config.arch),
        "num_classes": config.num_classes,
        "in_channels": config.in_channels,
        "bn_size": config.bn_size,
        "compression": config.compression,
        "drop_rate": config.drop_rate,
        "conv_bias": config.conv_bias,
    }
    assert DenseNetConfig.from_dict(d) == config
    assert DenseNetConfig.from_dict(json.loads(json.dumps(d))) == config


def test_from_dict_partial_uses_defaults() -> None:
    assert DenseNetConfig.from_dict({"growth_rate": 12}) == D2L.replace(growth_rate=12)


def test_from_dict_refuses_lr_like_any_unknown_key() -> None:
    # Training's learning rate is TrainSettings.lr; a configuration that names one is refused.
    with pytest.raises(ConfigError, match=r"unknown configuration keys \['lr'\]"):
        DenseNetConfig.from_dict({**D2L.to_dict(), "lr": 0.1})
    assert "lr" not in D2L.to_dict()


def test_from_dict_rejects_unknown_keys() -> None:
    d = D2L.to_dict()
    d["depth"] = 121
    d["dropout"] = 0.2
    with pytest.raises(ConfigError) as info:
        DenseNetConfig.from_dict(d)
    assert "depth" in str(info.value)
    assert "dropout" in str(info.value)


def test_from_dict_validates_values() -> None:
    with pytest.raises(ConfigError, match="growth_rate"):
        DenseNetConfig.from_dict({**D2L.to_dict(), "growth_rate": -1})


# ---------------------------------------------------------------------------------------------
# Canonical weight names


def _expected_prefixes(config: DenseNetConfig) -> list[str]:
    prefixes = ["stem"]
    for i, num_convs in enumerate(config.arch, start=1):
        prefixes += [f"dense{i}.conv{j}" for j in range(1, num_convs + 1)]
        if i != len(config.arch):
            prefixes.append(f"transition{i}")
    return prefixes + ["head"]


@pytest.mark.parametrize("config", [D2L, TINY, DenseNetConfig(num_channels=16, growth_rate=8, arch=(2, 3, 4))])
def test_canonical_spec_order_and_sizes(config: DenseNetConfig) -> None:
    spec = canonical_spec(config)
    names = list(spec)
    assert len(names) == len(set(names))
    # Every prefix's tensors are contiguous and the prefixes come in forward order.
    seen: list[str] = []
    for name in names:
        prefix = name.rsplit(".", 2)[0]
        if not seen or seen[-1] != prefix:
            assert prefix not in seen, f"{prefix} appears twice, not contiguously"
            seen.append(prefix)
    assert seen == _expected_prefixes(config)
    # Within a layer, the order of the forward pass: stem conv -> BN; conv blocks and
    # transitions BN -> conv (pre-activation); head BN -> dense.
    assert names[:6] == [
        "stem.conv.weight",
        "stem.conv.bias",
        "stem.bn.weight",
        "stem.bn.bias",
        "stem.bn.running_mean",
        "stem.bn.running_var",
    ]
    assert names[6:12] == [
        "dense1.conv1.bn.weight",
        "dense1.conv1.bn.bias",
        "dense1.conv1.bn.running_mean",
        "dense1.conv1.bn.running_var",
        "dense1.conv1.conv.weight",
        "dense1.conv1.conv.bias",
    ]
    assert names[-6:] == [
        "head.bn.weight",
        "head.bn.bias",
        "head.bn.running_mean",
        "head.bn.running_var",
        "head.fc.weight",
        "head.fc.bias",
    ]
    assert len(names) == 6 * (2 + sum(config.arch) + len(config.arch) - 1)
    sizes = {name: math.prod(shape) for name, shape in spec.items()}
    assert sum(sizes.values()) == count_params(config) + count_bn_stats(config)
    assert sum(v for k, v in sizes.items() if is_state(k)) == count_bn_stats(config)
    assert all(k.endswith(("running_mean", "running_var")) == is_state(k) for k in names)


def test_canonical_spec_shapes_d2l() -> None:
    spec = canonical_spec(D2L)
    assert spec["stem.conv.weight"] == (64, 1, 7, 7)
    assert spec["dense1.conv1.bn.weight"] == (64,)
    assert spec["dense1.conv4.conv.weight"] == (32, 160, 3, 3)
    assert spec["transition1.bn.running_var"] == (192,)
    assert spec["transition1.conv.weight"] == (96, 192, 1, 1)
    assert spec["dense4.conv1.conv.weight"] == (32, 120, 3, 3)
    assert spec["transition3.conv.weight"] == (120, 240, 1, 1)
    assert spec["head.bn.running_mean"] == (248,)
    assert spec["head.fc.weight"] == (10, 248)
    assert spec["head.fc.bias"] == (10,)


def test_in_channels_only_changes_the_stem() -> None:
    grey, rgb = canonical_spec(D2L), canonical_spec(D2L.replace(in_channels=3))
    assert list(grey) == list(rgb)
    assert {k for k in grey if grey[k] != rgb[k]} == {"stem.conv.weight"}
    assert count_params(D2L.replace(in_channels=3)) - count_params(D2L) == 2 * 64 * 49
