"""The memory check that refuses a run before anything is allocated (common.limits)."""

from __future__ import annotations

import pytest

from common.arch import count_bn_stats, count_params
from common.config import DenseNetConfig
from common.errors import InputError
from common.limits import activation_bytes, check_memory, weight_bytes


def test_weights_count_towards_the_memory_a_run_needs() -> None:
    config = DenseNetConfig(num_channels=8, growth_rate=8, arch=(2, 2))
    assert weight_bytes(config) == (count_params(config) + count_bn_stats(config)) * 4
    assert weight_bytes(config, "float64") == 2 * weight_bytes(config)
    need = activation_bytes(config, 32, 2) + weight_bytes(config)
    check_memory(config, 32, 2, available=need)  # exactly enough
    with pytest.raises(InputError, match=r"of activations, .* of weights\); this machine has"):
        check_memory(config, 32, 2, available=need - 1)  # the activations alone would fit


def test_a_huge_growth_rate_is_refused_for_its_weights() -> None:
    """`densenet summary --growth-rate 100000`: 13.7 GB of activations for one 96x96 image, but
    22.9 TB of weights; it used to pass the check and fail inside the framework."""
    config = DenseNetConfig(growth_rate=100_000)
    assert activation_bytes(config, 96, 1) < 20e9 < 20e12 < weight_bytes(config)
    with pytest.raises(InputError, match=r"growth_rate=100000 .* 22\.9 TB of weights\); this machine has 64\.0 GB"):
        check_memory(config, 96, 1, available=64 * 10**9)
