"""Training, checkpoints, resuming, evaluation across backends and plots: a few steps on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.cli import main
from common.config import DenseNetConfig
from common.train import TrainingError, TrainSettings, train
from common.weights import load_canonical, load_weights
from tests.test_data import make_dataset

SMALL = DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "fmnist", n_train=256, n_test=128)


def settings(backend: str, **changes) -> TrainSettings:
    base = dict(backend=backend, epochs=2, batch_size=32, lr=0.1, resize=32, seed=0, config=SMALL)
    return TrainSettings(**{**base, **changes})


def test_loss_falls_and_artefacts_are_written(backend_name: str, adapter, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    metrics = train(settings(backend_name, epochs=3), out, data_dir=dataset, progress=False)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["train_acc"] > metrics[0]["train_acc"]
    for name in ("run.json", "metrics.jsonl", "checkpoint.safetensors", "weights.safetensors", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    config, _ = load_weights(out / "weights.safetensors")
    assert config == SMALL
    assert json.loads((out / "run.json").read_text())["settings"]["backend"] == backend_name


@pytest.mark.torch
def test_resume_reaches_the_uninterrupted_result(dataset: Path, tmp_path: Path) -> None:
    whole = train(settings("torch"), tmp_path / "whole", data_dir=dataset, progress=False)
    train(settings("torch", epochs=1), tmp_path / "split", data_dir=dataset, progress=False)
    resumed = train(settings("torch"), tmp_path / "split", data_dir=dataset, resume=True, progress=False)
    assert [m["epoch"] for m in resumed] == [1, 2]
    assert resumed[-1]["train_loss"] == pytest.approx(whole[-1]["train_loss"], abs=1e-6)
    a = load_weights(tmp_path / "whole" / "weights.safetensors")[1]
    b = load_weights(tmp_path / "split" / "weights.safetensors")[1]
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.torch
def test_resume_refuses_other_settings(dataset: Path, tmp_path: Path) -> None:
    train(settings("torch", epochs=1), tmp_path / "run", data_dir=dataset, progress=False)
    with pytest.raises(TrainingError, match="other settings .*lr"):
        train(settings("torch", lr=0.5), tmp_path / "run", data_dir=dataset, resume=True, progress=False)
    with pytest.raises(TrainingError, match="does not exist"):
        train(settings("torch"), tmp_path / "none", data_dir=dataset, resume=True, progress=False)


@pytest.mark.torch
def test_non_finite_loss_stops_the_run(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.registry import load_backend

    adapter = load_backend("torch")
    calls = {"n": 0}
    original = type(adapter).train_step

    def poisoned(self, model, X, y, lr, compiled=False):
        calls["n"] += 1
        loss, logits = original(self, model, X, y, lr, compiled)
        return (float("nan") if calls["n"] == 11 else loss), logits

    monkeypatch.setattr(type(adapter), "train_step", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 3"):
        train(settings("torch"), tmp_path / "run", data_dir=dataset, progress=False)
    # The checkpoint of epoch 1 is intact and loads.
    assert load_canonical(tmp_path / "run" / "checkpoint.safetensors").metadata["epoch"] == "1"


@pytest.mark.torch
def test_ctrl_c_leaves_a_usable_checkpoint(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.registry import load_backend

    adapter = load_backend("torch")
    calls = {"n": 0}
    original = type(adapter).train_step

    def interrupted(self, model, X, y, lr, compiled=False):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(self, model, X, y, lr, compiled)

    monkeypatch.setattr(type(adapter), "train_step", interrupted)
    with pytest.raises(TrainingError, match="interrupted; .* after epoch 1"):
        train(settings("torch"), tmp_path / "run", data_dir=dataset, progress=False)
    monkeypatch.setattr(type(adapter), "train_step", original)
    metrics = train(settings("torch"), tmp_path / "run", data_dir=dataset, resume=True, progress=False)
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_too_small_resize_is_refused(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="too small"):
        train(settings("torch", resize=4), tmp_path / "run", data_dir=dataset, progress=False)


@pytest.mark.torch
@pytest.mark.jax
def test_cli_train_evaluate_in_another_backend_and_plot(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    from tests.conftest import get_adapter

    get_adapter("torch", request.config)
    get_adapter("jax", request.config)
    common = ["--data-dir", str(dataset), "--resize", "32"]
    net = ["--num-channels", "16", "--growth-rate", "16", "--arch", "2,2"]
    assert (
        main(
            [
                "train",
                "--backend",
                "torch",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--lr",
                "0.1",
                "--out",
                str(tmp_path / "t"),
                "--quiet",
                *net,
                *common,
            ]
        )
        == 0
    )
    assert "torch: 2 epoch(s)" in capsys.readouterr().out
    test_acc = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    for backend in ("torch", "jax"):
        assert (
            main(
                [
                    "evaluate",
                    "--weights",
                    str(tmp_path / "t" / "weights.safetensors"),
                    "--backend",
                    backend,
                    "--json",
                    *common,
                ]
            )
            == 0
        )
        result = json.loads(capsys.readouterr().out)
        assert result["test_acc"] == pytest.approx(test_acc, abs=1 / 128)  # at most one image flips
    assert (
        main(
            [
                "train",
                "--backend",
                "jax",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--lr",
                "0.1",
                "--out",
                str(tmp_path / "j"),
                "--quiet",
                *net,
                *common,
            ]
        )
        == 0
    )
    assert main(["plot", str(tmp_path / "t"), str(tmp_path / "j"), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_data_speed_command(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data-speed", "--data-dir", str(dataset), "--resize", "32"]) == 0
    assert "input pipeline: 256 images at 32x32" in capsys.readouterr().out


def test_learning_rate_schedules() -> None:
    constant = settings("torch")
    assert constant.lr_at(0, 100) == constant.lr_at(99, 100) == 0.1
    cosine = settings("torch", lr_schedule="cosine")
    assert cosine.lr_at(0, 100) == pytest.approx(0.1)
    assert cosine.lr_at(50, 100) == pytest.approx(0.05)
    assert cosine.lr_at(100, 100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(TrainingError, match="lr_schedule"):
        settings("torch", lr_schedule="step")
    with pytest.raises(TrainingError, match="learning rate must be positive"):
        settings("torch", lr=0.0)
