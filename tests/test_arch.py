"""The one walk over the architecture (common.arch) and what the core derives from it.

The expectations are written out by hand or come from the book's numbers; the backends and the
numpy reference, which build the network with their own loops, are checked against the same
derived plan and spec in test_backends.py and test_reference.py.
"""

from __future__ import annotations

import pytest

from common.arch import (
    KINDS,
    Layer,
    bn_counts,
    canonical_layers,
    canonical_spec,
    count_bn_stats,
    count_macs,
    count_params,
    min_input_size,
    plan,
    plan_channels,
    stage_names,
    walk,
)
from common.config import CONFIGS, D2L, DenseNetConfig
from common.errors import ConfigError, InputError

TINY = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
BC = DenseNetConfig(num_channels=16, growth_rate=8, arch=(2, 3), bn_size=4, drop_rate=0.2, conv_bias=False)
# The golden case with an odd, non-square input: 3-channel 33x40 images.
RGB = DenseNetConfig(num_channels=16, growth_rate=16, arch=(1, 1), num_classes=5, in_channels=3)
ALL = [D2L, TINY, BC, RGB, *CONFIGS.values()]


def _fields(layer: Layer) -> tuple:
    return (layer.name, layer.kind, layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding)


@pytest.mark.parametrize("config", ALL, ids=lambda c: c.describe())
def test_walk_is_a_chain_in_forward_order(config: DenseNetConfig) -> None:
    layers = walk(config, 64)
    assert len({layer.name for layer in layers}) == len(layers)
    assert {layer.kind for layer in layers} <= set(KINDS)
    assert layers[0].in_channels == config.in_channels and layers[0].in_size == (64, 64)
    for before, after in zip(layers, layers[1:]):
        assert after.in_channels == before.out_channels, after.name
        assert after.in_size == before.out_size, after.name
    assert layers[-1].name == "head.fc" and layers[-1].out_channels == config.num_classes
    # Stages appear once each, contiguously, in the order stage_names gives.
    order = [layer.stage for layer in layers]
    assert list(dict.fromkeys(order)) == stage_names(config)
    assert all(layer.name.startswith(layer.stage + ".") for layer in layers)
    # The same layers with or without an input size, only the sizes differ.
    assert [_fields(layer) for layer in walk(config)] == [_fields(layer) for layer in layers]
    assert all(layer.in_size is None and layer.out_size is None for layer in walk(config))


@pytest.mark.parametrize("config", ALL, ids=lambda c: c.describe())
def test_walk_matches_the_canonical_spec_exactly(config: DenseNetConfig) -> None:
    spec = canonical_spec(config)
    tensors = [layer for layer in walk(config) if layer.holds_tensors]
    # Every tensor belongs to one tensor-holding layer of the walk, in the walk's order.
    prefixes = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in spec))
    assert prefixes == [layer.name for layer in tensors]
    assert canonical_layers(config) == [(layer.name, layer.kind) for layer in tensors]
    for layer in tensors:
        if layer.kind == "conv":
            assert spec[f"{layer.name}.weight"] == (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel)
            assert (f"{layer.name}.bias" in spec) == config.conv_bias
        elif layer.kind == "bn":
            assert layer.in_channels == layer.out_channels
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                assert spec[f"{layer.name}.{leaf}"] == (layer.out_channels,)
        else:
            assert spec[f"{layer.name}.weight"] == (layer.out_channels, layer.in_channels)
            assert spec[f"{layer.name}.bias"] == (layer.out_channels,)


def test_stem_names_strides_and_paddings() -> None:
    stem = [layer for layer in walk(D2L, 96) if layer.stage == "stem"]
    assert [(layer.name, layer.kind, layer.kernel, layer.stride, layer.padding) for layer in stem] == [
        ("stem.conv", "conv", 7, 2, 3),
        ("stem.bn", "bn", 1, 1, 0),
        ("stem.relu", "relu", 1, 1, 0),
        ("stem.pool", "maxpool", 3, 2, 1),
    ]
    assert [(layer.in_channels, layer.out_channels) for layer in stem] == [(1, 64), (64, 64), (64, 64), (64, 64)]
    assert [layer.out_size for layer in stem] == [(48, 48), (48, 48), (48, 48), (24, 24)]


def test_transition_and_head() -> None:
    layers = {layer.name: layer for layer in walk(D2L, 96)}
    conv, pool = layers["transition1.conv"], layers["transition1.pool"]
    assert (conv.in_channels, conv.out_channels, conv.kernel, conv.out_size) == (192, 96, 1, (24, 24))
    assert (pool.kind, pool.kernel, pool.stride, pool.padding, pool.out_size) == ("avgpool", 2, 2, 0, (12, 12))
    assert "transition4.bn" not in layers  # no transition after the last dense block
    head = [layer for layer in walk(D2L, 96) if layer.stage == "head"]
    assert [(layer.name, layer.kind) for layer in head] == [
        ("head.bn", "bn"),
        ("head.relu", "relu"),
        ("head.pool", "globalpool"),
        ("head.fc", "fc"),
    ]
    assert head[2].kernel is None and head[2].in_size == (3, 3) and head[2].out_size == (1, 1)
    assert (head[3].in_channels, head[3].out_channels) == (248, 10)


def test_odd_non_square_input_floors_like_the_frameworks() -> None:
    layers = {layer.name: layer for layer in walk(RGB, (33, 40))}
    # (33 + 6 - 7) // 2 + 1 = 17, (40 + 6 - 7) // 2 + 1 = 20; then (s + 2 - 3) // 2 + 1; then s // 2.
    assert layers["stem.conv"].out_size == (17, 20)
    assert layers["stem.pool"].out_size == (9, 10)
    assert layers["dense1.conv1.conv"].out_size == (9, 10)
    assert layers["transition1.pool"].out_size == (4, 5)
    assert layers["head.pool"].in_size == (4, 5)
    assert [(s.height, s.width) for s in plan(RGB, (33, 40)).stages] == [(9, 10), (9, 10), (4, 5), (4, 5), (1, 1)]


def test_densenet_bc_bottleneck_layers() -> None:
    layers = [layer for layer in walk(BC) if layer.name.startswith("dense1.conv2.")]
    # The second dense layer sees 16 + 8 channels; bn_size * growth_rate = 32 bottleneck channels.
    assert [(layer.name, layer.kind, layer.in_channels, layer.out_channels, layer.kernel) for layer in layers] == [
        ("dense1.conv2.bottleneck.bn", "bn", 24, 24, 1),
        ("dense1.conv2.bottleneck.relu", "relu", 24, 24, 1),
        ("dense1.conv2.bottleneck.conv", "conv", 24, 32, 1),
        ("dense1.conv2.bn", "bn", 32, 32, 1),
        ("dense1.conv2.relu", "relu", 32, 32, 1),
        ("dense1.conv2.conv", "conv", 32, 8, 3),
        ("dense1.conv2.dropout", "dropout", 8, 8, 1),
        ("dense1.conv2.concat", "concat", 8, 32, 1),
    ]
    assert layers[5].padding == 1 and layers[2].padding == 0
    # The book's block has neither bottleneck nor dropout.
    assert [layer.name for layer in walk(TINY) if layer.name.startswith("dense1.conv2.")] == [
        "dense1.conv2.bn",
        "dense1.conv2.relu",
        "dense1.conv2.conv",
        "dense1.conv2.concat",
    ]


def test_densenet121_first_dense_layer() -> None:
    layers = {layer.name: layer for layer in walk(CONFIGS["densenet121"], 224)}
    assert layers["dense1.conv1.bottleneck.conv"].out_channels == 128
    assert layers["dense1.conv1.concat"].out_channels == 96
    assert layers["dense1.conv1.conv"].out_size == (56, 56)
    assert layers["transition3.conv"].out_channels == 512
    assert layers["head.fc"].in_channels == 1024


def test_counts_follow_from_the_walk() -> None:
    assert count_params(D2L) == 758_226
    assert count_bn_stats(D2L) == 6_608
    assert count_params(CONFIGS["densenet121"]) == 7_978_856
    for config in ALL:
        layers = walk(config, 40)
        params = stats = macs = 0
        for layer in layers:
            if layer.kind == "conv":
                params += layer.out_channels * (layer.in_channels * layer.kernel**2 + config.conv_bias)
                macs += layer.in_channels * layer.out_channels * layer.kernel**2 * layer.out_size[0] * layer.out_size[1]
            elif layer.kind == "bn":
                params += 2 * layer.out_channels
                stats += 2 * layer.out_channels
            elif layer.kind == "fc":
                params += layer.out_channels * (layer.in_channels + 1)
                macs += layer.in_channels * layer.out_channels
        assert (count_params(config), count_bn_stats(config), count_macs(config, 40)) == (params, stats, macs)


def test_plan_channels_are_each_stages_last_layer() -> None:
    assert plan_channels(TINY) == [("stem", 8), ("dense1", 16), ("transition1", 8), ("dense2", 16), ("head", 10)]
    assert dict(plan_channels(BC))["transition1"] == 16  # (16 + 2 * 8) // 2


@pytest.mark.parametrize("config", [D2L, TINY, BC, RGB, DenseNetConfig(arch=(1,) * 6)], ids=lambda c: c.describe())
def test_min_input_size_is_the_smallest_side_the_walk_accepts(config: DenseNetConfig) -> None:
    def fits(side: int) -> bool:
        return all(min(layer.out_size) >= 1 for layer in walk(config, side))

    smallest = min_input_size(config)
    assert fits(smallest)
    assert not any(fits(side) for side in range(1, smallest))


def test_bn_counts_are_the_values_each_batchnorm_averages() -> None:
    counts = bn_counts(D2L, (96, 64), 2)
    assert list(counts) == [layer.name.removesuffix(".bn") for layer in walk(D2L) if layer.kind == "bn"]
    assert counts["stem"] == 2 * 48 * 32  # after the stem conv, before the max pool
    assert counts["dense1.conv1"] == counts["transition1"] == 2 * 24 * 16
    assert counts["dense2.conv1"] == 2 * 12 * 8
    assert counts["head"] == 2 * 3 * 2
    bc = bn_counts(BC, 32, 4)
    assert bc["dense1.conv1.bottleneck"] == bc["dense1.conv1"] == 4 * 8 * 8
    with pytest.raises(InputError, match="too small"):
        bn_counts(D2L, 28, 2)


def test_compressing_to_nothing_is_refused_by_the_walk() -> None:
    with pytest.raises(ConfigError, match="transition 1 would compress the channels to zero"):
        DenseNetConfig(num_channels=1, growth_rate=1, arch=(1, 1), compression=0.1)
