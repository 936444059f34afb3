"""Training, checkpoints, resuming, evaluation across backends and plots: a few steps on tiny data."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from common.cli import main
from common.config import DenseNetConfig
from common.training.run import train
from common.training.settings import TrainingError, TrainSettings
from common.weights.canonical import load_canonical, load_weights
from tests.helpers import run_cli as cli
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
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["backend"] == backend_name
    # run.json records which files were read, with their checksums.
    files = info["data"]["files"]
    assert files["train_images"]["path"] == str((dataset / "train-images-idx3-ubyte.gz").resolve())
    expected = hashlib.sha256((dataset / "t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    assert files["test_labels"]["sha256"] == expected


@pytest.mark.torch
def test_resume_reaches_the_uninterrupted_result(dataset: Path, tmp_path: Path) -> None:
    whole = train(settings("torch"), tmp_path / "whole", data_dir=dataset, progress=False)
    train(settings("torch", epochs=1), tmp_path / "split", data_dir=dataset, progress=False)
    resumed = train(settings("torch"), tmp_path / "split", data_dir=dataset, resume=True, progress=False)
    assert [m["epoch"] for m in resumed] == [1, 2]
    assert resumed[-1]["train_loss"] == pytest.approx(whole[-1]["train_loss"], abs=1e-6)
    # steps.jsonl: every step of both epochs, the first epoch's kept from the interrupted call.
    steps = [
        [json.loads(line) for line in (tmp_path / d / "steps.jsonl").read_text().splitlines()]
        for d in ("whole", "split")
    ]
    assert [(s["epoch"], s["step"]) for s in steps[1]] == [(s["epoch"], s["step"]) for s in steps[0]]
    assert len(steps[0]) == 2 * 256 // 32
    np.testing.assert_allclose([s["loss"] for s in steps[1]], [s["loss"] for s in steps[0]], rtol=0, atol=1e-6)
    a = load_weights(tmp_path / "whole" / "weights.safetensors")[1]
    b = load_weights(tmp_path / "split" / "weights.safetensors")[1]
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)


def test_resume_continues_a_momentum_run_exactly(backend_name: str, adapter, dataset: Path, tmp_path: Path) -> None:
    """Nesterov momentum, weight decay, warm-up then cosine: 2 epochs straight and 1 + resume 1 give
    the same weights and velocities bit for bit. The checkpoint holds the float32 weights and
    velocities the model trains in and the step where the schedule goes on, and the batches are a
    function of (seed, epoch), so the resumed run repeats the same operations on the same numbers."""
    recipe = dict(
        momentum=0.9, nesterov=True, weight_decay=1e-4, lr_schedule="cosine", warmup_epochs=0.5, limit=64, test_limit=32
    )
    whole = train(settings(backend_name, **recipe), tmp_path / "whole", data_dir=dataset, progress=False)
    train(settings(backend_name, epochs=1, **recipe), tmp_path / "split", data_dir=dataset, progress=False)
    first = load_canonical(tmp_path / "split" / "checkpoint.safetensors")
    assert first.metadata["step"] == "2" and len(first.optimizer_state) == len(
        [k for k in first.weights if not k.endswith(("running_mean", "running_var"))]
    )
    assert any(v.any() for v in first.optimizer_state.values())
    resumed = train(settings(backend_name, **recipe), tmp_path / "split", data_dir=dataset, resume=True, progress=False)
    assert resumed[-1]["train_loss"] == whole[-1]["train_loss"]
    a = load_canonical(tmp_path / "whole" / "checkpoint.safetensors")
    b = load_canonical(tmp_path / "split" / "checkpoint.safetensors")
    assert a.metadata["step"] == b.metadata["step"] == "4"
    for k in a.weights:
        np.testing.assert_array_equal(b.weights[k], a.weights[k], err_msg=k)
    for k in a.optimizer_state:
        np.testing.assert_array_equal(b.optimizer_state[k], a.optimizer_state[k], err_msg=k)


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
    with pytest.raises(TrainingError, match="interrupted in epoch 2; .* holds the weights after epoch 1"):
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
    from tests.helpers import get_adapter

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
    with pytest.raises(TrainingError, match="lr_schedule must be one of"):
        settings("torch", lr_schedule="linear")
    with pytest.raises(TrainingError, match="step schedule needs milestones"):
        settings("torch", lr_schedule="step")
    step = settings("torch", epochs=4, lr_schedule="step", lr_milestones=(2,), warmup_epochs=1)
    assert [step.lr_at(t, 40) for t in (0, 9, 10, 19, 20)] == pytest.approx([0.01, 0.1, 0.1, 0.1, 0.01])
    for lr in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(TrainingError, match="learning rate must be a finite number above 0"):
            settings("torch", lr=lr)


# ------------------------------------------------------------------------------------------------
# Never lose a run; say what is true when one stops (issue 10)

SMALL_ARGS = ["--num-channels", "16", "--growth-rate", "16", "--arch", "2,2"]


def strict_json_lines(path: Path) -> list[dict]:
    """Each line parsed as JSON proper: a bare NaN or Infinity is an error, as in every other parser."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("limit", "step"), [(64, 2), (32, 1)], ids=["in-a-step", "after-the-epoch"])
def test_divergence_is_handled_the_same_way_in_every_backend(
    backend_name: str, adapter, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: int, step: int
) -> None:
    """lr 1e30: a non-finite loss at step 2, or (one step per epoch) a non-finite test loss after
    step 1. Every backend stops with the same line and exit status 1, and keeps nothing."""
    from tests.test_cli_errors import assert_one_clear_error

    out = tmp_path / "run"
    code, _, err = cli(
        capsys,
        *("train", "--backend", backend_name, "--epochs", "2", "--batch-size", "32", "--lr", "1e30"),
        *("--resize", "32", "--limit", limit, "--test-limit", "64", "--quiet", *SMALL_ARGS),
        *("--out", out, "--data-dir", dataset),
    )
    assert_one_clear_error(code, err, 1, f"loss became nan at epoch 1, step {step} (learning rate 1e+30)")
    assert "; no epoch finished, so nothing was kept" in err
    assert not out.exists()  # the run made the directory, and leaves nothing half-made behind


@pytest.mark.torch
def test_divergence_in_a_later_epoch_keeps_valid_metrics(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.registry import load_backend
    from common.training.settings import Diverged

    adapter = load_backend("torch")
    original = type(adapter).forward

    calls: list[int] = []

    def nan_on_the_second_evaluation(self, model, X, **kwargs):
        calls.append(1)
        logits = original(self, model, X, **kwargs)
        return logits * np.nan if len(calls) == 2 else logits

    monkeypatch.setattr(type(adapter), "forward", nan_on_the_second_evaluation)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"loss became nan at epoch 2, step 8 .* made the test loss nan") as info:
        train(settings("torch"), out, data_dir=dataset, progress=False)
    assert f"{out / 'checkpoint.safetensors'} holds the weights after epoch 1" in str(info.value)
    assert [m["epoch"] for m in strict_json_lines(out / "metrics.jsonl")] == [1]
    assert load_canonical(out / "checkpoint.safetensors").metadata["epoch"] == "1"


def test_metrics_are_json_without_nan() -> None:
    from common.training.rundir import metrics_text

    text = metrics_text([{"epoch": 1, "test_loss": float("nan"), "train_loss": float("inf"), "test_acc": 0.5}])
    assert json.loads(text) == {"epoch": 1, "test_loss": None, "train_loss": None, "test_acc": 0.5}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.torch
def test_train_refuses_a_directory_that_holds_a_run(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_cli_errors import assert_one_clear_error, snapshot

    out = tmp_path / "run"
    train(settings("torch", epochs=1), out, data_dir=dataset, progress=False)
    before = snapshot(tmp_path)
    for backend in ("torch", "jax"):  # the default --out runs/BACKEND makes this easy to do by accident
        with pytest.raises(TrainingError, match="already holds a torch run of 1 epoch"):
            train(settings(backend, epochs=1), out, data_dir=dataset, progress=False)
    code, _, err = cli(capsys, "train", "--backend", "torch", "--out", out, "--data-dir", dataset)
    assert_one_clear_error(code, err, 2, "--resume", "a new --out", "--overwrite")
    assert snapshot(tmp_path) == before
    (out / "notes.txt").write_text("the user's own notes")
    before = snapshot(tmp_path)
    # --overwrite replaces the run only once the new one has an epoch to show for itself.
    from common.registry import load_backend

    def interrupted(self, model, X, y, lr, compiled=False):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(type(load_backend("torch")), "train_step", interrupted)
        with pytest.raises(TrainingError, match="nothing was written: the run in .* is as it was"):
            train(settings("torch", epochs=2, seed=3), out, data_dir=dataset, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before
    metrics = train(settings("torch", epochs=2, seed=3), out, data_dir=dataset, overwrite=True, progress=False)
    assert len(metrics) == 2 == len(strict_json_lines(out / "metrics.jsonl"))
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 3
    assert (out / "notes.txt").read_text() == "the user's own notes"  # --overwrite replaces a run, nothing else


@pytest.mark.torch
def test_ctrl_c_in_the_first_epoch_says_nothing_was_kept(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.registry import load_backend
    from tests.test_cli_errors import assert_one_clear_error

    adapter = load_backend("torch")
    original = type(adapter).train_step

    def interrupted(self, model, X, y, lr, compiled=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(adapter), "train_step", interrupted)
    out = tmp_path / "run"
    argv = ["train", "--backend", "torch", "--epochs", "1", "--resize", "32", "--batch-size", "32", *SMALL_ARGS]
    code, _, err = cli(capsys, *argv, "--out", out, "--data-dir", dataset, "--quiet")
    assert_one_clear_error(code, err, 130, "interrupted in epoch 1; no epoch finished, so nothing was kept")
    assert "--resume" not in err
    assert not out.exists()
    # What the message says is true: the same command starts again.
    monkeypatch.setattr(type(adapter), "train_step", original)
    code, out_text, err = cli(capsys, *argv, "--out", out, "--data-dir", dataset, "--quiet")
    assert code == 0, err


@pytest.mark.torch
def test_resume_with_a_missing_or_truncated_metrics_file(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_errors import assert_one_clear_error, snapshot

    out = tmp_path / "run"
    train(settings("torch", epochs=1), out, data_dir=dataset, progress=False)
    metrics = out / "metrics.jsonl"
    argv = ["train", "--backend", "torch", "--epochs", "2", "--batch-size", "32", "--lr", "0.1", "--resize", "32"]
    argv += [*SMALL_ARGS, "--out", str(out), "--data-dir", str(dataset), "--resume", "--quiet"]
    metrics.write_text(metrics.read_text()[:25])
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, *argv)
    assert_one_clear_error(code, err, 2, "metrics.jsonl line 1 is not valid JSON", "holds epoch 1")
    metrics.unlink()
    code, _, err = cli(capsys, *argv)
    assert_one_clear_error(code, err, 2, "metrics.jsonl does not exist")
    assert snapshot(tmp_path) == {k: v for k, v in before.items() if k != "run/metrics.jsonl"}


@pytest.mark.torch
def test_progress_is_one_line_per_epoch_off_a_terminal(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(settings("torch", limit=96), tmp_path / "log", data_dir=dataset, progress=True, live=False)
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["torch epoch 1/2", "torch epoch 2/2"]
    assert all("test loss" in line and "img/s" in line for line in lines)
    train(settings("torch", limit=96), tmp_path / "tty", data_dir=dataset, progress=True, live=True)
    out, err = capsys.readouterr()
    assert "step 1/3: compiling (a new batch shape" in err and "evaluating" in err
    assert len(out.splitlines()) == 2


@pytest.mark.torch
def test_evaluate_uses_the_files_resize_and_says_so(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    train(settings("torch", epochs=1, resize=40), out, data_dir=dataset, progress=False)
    weights = str(out / "weights.safetensors")
    base = ["evaluate", "--weights", weights, "--backend", "torch", "--data-dir", str(dataset)]
    code, text, err = cli(capsys, *base)
    assert code == 0, err
    assert "at 40x40 (the file's training settings; --resize overrides)" in text
    assert f"{weights}: DenseNet {SMALL.describe()} (the file's configuration)" in text
    expected = json.loads((out / "metrics.jsonl").read_text())["test_acc"]
    code, text, _ = cli(capsys, *base, "--json")
    result = json.loads(text)
    assert (result["resize"], result["test_acc"], result["config"]) == (40, expected, SMALL.to_dict())
    code, text, _ = cli(capsys, *base, "--resize", "32", "--json", *SMALL_ARGS)
    assert code == 0 and json.loads(text)["resize"] == 32 and json.loads(text)["resize_from"] == "--resize"


@pytest.mark.torch
def test_without_matplotlib_training_finishes_and_plot_says_why(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_errors import assert_one_clear_error

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "run"
    metrics = train(settings("torch", epochs=1), out, data_dir=dataset, progress=False)
    assert len(metrics) == 1 and (out / "weights.safetensors").is_file() and not (out / "curves.png").exists()
    assert "curves.png not drawn: drawing curves needs matplotlib" in capsys.readouterr().err
    code, _, err = cli(capsys, "plot", out, "--out", tmp_path / "c.png")
    assert_one_clear_error(code, err, 1, "pip install 'densenet-suite[cli]'")


def test_curves_mark_every_point(tmp_path: Path) -> None:
    """With one epoch each line is one point: only a marker makes it visible."""
    from common.training.plot import figure

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "train_loss": 1.2, "test_loss": 1.1, "test_acc": 0.6}) + "\n"
    )
    fig = figure([run])
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 3
    assert all(line.get_marker() not in (None, "", "None", " ") for line in lines)


def test_plot_does_not_replace_an_existing_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "train_loss": 1.2, "test_loss": 1.1, "test_acc": 0.6}) + "\n"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "curves.png").write_text("the user's own picture")
    code, _, err = cli(capsys, "plot", "run")
    assert code == 2 and "curves.png already exists and no --out was given" in err
    assert (tmp_path / "curves.png").read_text() == "the user's own picture"
    assert cli(capsys, "plot", "run", "--out", "curves.png")[0] == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_data_dir_is_used_or_refused(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A named directory never falls back to another copy, even when one exists."""
    from common import data

    other = make_dataset(tmp_path / "cache" / "densenet-suite" / "fashion-mnist", n_train=32, n_test=32)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.find(None, download=False) == other
    partial = make_dataset(tmp_path / "partial")
    (partial / "train-labels-idx1-ubyte.gz").unlink()
    for named, message in ((tmp_path / "none", "does not exist"), (partial, "lacks 1 of the 4")):
        with pytest.raises(data.DataError, match=message):
            data.find(named)
        monkeypatch.setenv(data.ENV_VAR, str(named))
        with pytest.raises(data.DataError, match=r"\$DENSENET_DATA_DIR .*" + message):
            data.find(None)
        monkeypatch.delenv(data.ENV_VAR)
    assert data.find(dataset) == dataset


def test_progress_leaves_compiling_steps_out_of_speed_and_time_left() -> None:
    import io

    from common.training.callbacks import speed
    from common.training.progress import Progress, format_seconds

    stream, out = io.StringIO(), io.StringIO()
    bar = Progress("jax", 2, 3, live=True, stream=stream, out=out)
    bar.REFRESH_S = 0.0
    bar.start_epoch(0)
    bar.before_step(compiling=True)
    assert "jax epoch 1/2: step 1/3: compiling" in stream.getvalue()
    bar.after_step(32, 50.0, True, 2.3, 0.1)  # the 50 s of compiling count nowhere
    assert bar.images_per_s() is None and bar.seconds_left() is None
    bar.after_step(32, 0.5, False, 2.2, 0.2)
    assert bar.images_per_s() == 64
    assert bar.seconds_left() == pytest.approx(4 * 0.5)  # 1 step of this epoch and 3 of the next
    bar.evaluating(0, 2)
    assert stream.getvalue().rstrip().endswith("\rjax epoch 1/2: evaluating 0/2 batches")
    bar.epoch_line("jax epoch 1/2: done")
    assert out.getvalue() == "jax epoch 1/2: done\n"
    assert format_seconds(3723) == "1:02:03" and format_seconds(59) == "0:59"
    assert (
        speed(None, "compiling took 6 s")
        == "speed not measured (every step was a first, compiling one; compiling took 6 s)"
    )
    assert speed(1105.4) == "1,105 img/s"
    quiet = Progress("jax", 1, 1, quiet=True, stream=stream, out=out)
    quiet.epoch_line("nothing")
    assert "nothing" not in out.getvalue()


def test_augment_padding_is_recorded_and_checked() -> None:
    from common.training.run import _augment_info

    assert _augment_info(settings("torch", augment=True))["padding"] == 4  # resize 32 // 8
    assert _augment_info(settings("torch", augment=True, augment_padding=0))["padding"] == 0
    assert _augment_info(settings("torch", augment_padding=None)) is None
    with pytest.raises(TrainingError, match="needs augmentation on"):
        settings("torch", augment_padding=2)
    with pytest.raises(TrainingError, match=r"0 to the image side \(32\) pixels, got 33"):
        settings("torch", augment=True, augment_padding=33)
