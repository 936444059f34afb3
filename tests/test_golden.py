"""The committed golden vectors: they match the oracle, and every backend matches them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common.arch import is_state
from common.oracle import golden
from common.weights.safetensors_io import load_file, save_file

CASES = {case.name: case for case in golden.CASES}


def test_committed_files_have_not_drifted() -> None:
    assert golden.drift() == []


def test_drift_is_detected(tmp_path: Path) -> None:
    for case in golden.CASES:
        shutil.copy(golden.path_of(case), tmp_path)
    path = golden.path_of(golden.CASES[0], tmp_path)
    tensors, metadata = load_file(path)
    tensors["inference/head"] = tensors["inference/head"] + np.float32(1e-4)
    save_file(tensors, path, metadata)
    (tmp_path / f"{golden.CASES[1].name}.safetensors").unlink()
    problems = golden.drift(tmp_path)
    assert any("inference/head drifted" in p for p in problems)
    assert any(p.startswith(golden.CASES[1].name) for p in problems)


def test_files_are_small() -> None:
    total = sum(golden.path_of(case).stat().st_size for case in golden.CASES)
    assert total < 400_000


@pytest.mark.parametrize("case_name", list(CASES))
def test_backend_matches_golden(adapter, case_name: str) -> None:
    g = golden.load(CASES[case_name])
    weights, X, y = g.group("weights"), g.tensors["input"], g.tensors["labels"]
    model = adapter.build(g.config, seed=0)
    adapter.set_weights(model, weights)
    for mode, training in (("inference", False), ("train", True)):
        got = adapter.stages(model, X, training=training)
        expected = g.group(mode)
        assert list(got) == list(expected)
        for stage, value in expected.items():
            assert golden.error(got[stage], value) <= g.tolerances[mode], f"{mode} {stage}"
        adapter.set_weights(model, weights)  # torch and Keras update statistics in a training forward

    adapter.loss_and_grads(model, X, y)  # a full training step updates the statistics everywhere
    # Every adapter keeps the canonical (unbiased) running variance, so no conversion is needed.
    stats = {k: v for k, v in adapter.get_weights(model).items() if is_state(k)}
    for name, value in g.group("running").items():
        assert golden.error(stats[name], value) <= g.tolerances["running"], name
