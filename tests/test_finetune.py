"""Starting weights (``--init``), fine-tuning with a new head, other data sets, per-step records,
and the proof that four backends train in lockstep from one file with augmentation on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common import data
from common.config import DenseNetConfig
from common.errors import WeightFileError
from common.oracle import reference_grad
from common.training.run import train
from common.training.settings import TrainingError, TrainSettings
from common.verify.parity import PARITY_CASE, bound
from common.weights import peers
from common.weights.canonical import init_canonical, load_weights, save_weights
from common.weights.safetensors_io import write_weights
from common.weights.starting import HEAD, read_init, starting_weights
from tests.helpers import participating_backends
from tests.helpers import run_cli as cli
from tests.test_datasets import make_cifar, make_folder

BC = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2), bn_size=2, conv_bias=False, in_channels=3)


@pytest.fixture
def canonical(tmp_path: Path) -> Path:
    path = tmp_path / "start.safetensors"
    save_weights(path, init_canonical(PARITY_CASE, 11), PARITY_CASE, source="numpy-init")
    return path


def test_a_new_num_classes_replaces_only_the_head(canonical: Path) -> None:
    three = PARITY_CASE.replace(num_classes=3)
    start = starting_weights(canonical, "canonical", three, seed=5)
    file_weights = load_weights(canonical)[1]
    fresh = init_canonical(three, 5)
    for k, v in start.weights.items():
        expected = fresh[k] if k in HEAD else file_weights[k]
        assert np.array_equal(v, expected), k
    assert start.record["head_replaced"]["file_classes"] == 10 and start.record["head_replaced"]["classes"] == 3
    assert "head predicts 10 classes, this run 3" in start.notice and "seed 5" in start.notice
    same = starting_weights(canonical, "canonical", PARITY_CASE, seed=5)
    assert same.notice is None and same.record["head_replaced"] is None
    assert all(np.array_equal(same.weights[k], file_weights[k]) for k in file_weights)


def test_other_differences_are_named(canonical: Path) -> None:
    with pytest.raises(WeightFileError, match="arch: file has 2,2, network has 2,2,2"):
        starting_weights(canonical, "canonical", PARITY_CASE.replace(arch=(2, 2, 2)), 0)
    with pytest.raises(WeightFileError, match="in_channels: file has 1, network has 3") as info:
        starting_weights(canonical, "canonical", PARITY_CASE.replace(in_channels=3, num_classes=4), 0)
    assert "num_classes" not in str(info.value).split(":\n")[1]  # the head is not a mismatch


@pytest.mark.parametrize("fmt", ["torchvision", "keras"])
def test_a_peer_file_starts_from_the_same_tensors(tmp_path: Path, fmt: str) -> None:
    weights = init_canonical(BC, 2)
    path = tmp_path / f"{fmt}.npz"
    write_weights(peers.to_torchvision(weights, BC) if fmt == "torchvision" else peers.to_keras(weights, BC), path)
    found = read_init(path, fmt)
    assert found.config == BC
    assert found.metadata["running_var"] == ("unbiased" if fmt == "torchvision" else "biased")
    for k, v in weights.items():
        np.testing.assert_allclose(found.weights[k], v, rtol=0, atol=1e-7, err_msg=k)  # Keras's epsilon shift


@pytest.mark.torch
def test_fine_tune_on_an_image_folder_from_the_cli(
    canonical: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    from tests.helpers import get_adapter

    get_adapter("torch", request.config)
    pictures = make_folder(tmp_path / "pics", {"circle": 12, "square": 12, "star": 12})
    out = tmp_path / "run"
    argv = ["train", "--backend", "torch", "--dataset", "folder", "--data-dir", pictures, "--init", canonical]
    argv += ["--num-classes", "3", "--resize", "32", "--batch-size", "8", "--lr", "0.05", "--augment", "--quiet"]
    code, stdout, err = cli(capsys, *argv, "--epochs", "1", "--out", out)
    assert code == 0, err
    assert "head predicts 10 classes, this run 3" in err  # said on the console
    assert "images have 3 channel(s) and the network in_channels=1" in err  # the file's network is grey
    assert "val accuracy" in stdout
    info = json.loads((out / "run.json").read_text())
    assert info["init"]["head_replaced"]["classes"] == 3 and info["init"]["path"] == str(canonical.resolve())
    assert info["data"]["classes"] == ["circle", "square", "star"] and info["data"]["evaluated_on"] == "val"
    assert info["data"]["augment"]["padding"] == 4
    assert info["settings"]["config"]["num_classes"] == 3 and info["settings"]["config"]["in_channels"] == 1
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    n_train = info["data"]["train_images"]
    assert len(steps) == -(-n_train // 8) and steps[0] == {**steps[0], "epoch": 1, "step": 1, "lr": 0.05}
    # The same command continues the run; other data settings or other files are refused.
    code, _, err = cli(capsys, *argv, "--epochs", "2", "--out", out, "--resume")
    assert code == 0, err
    assert [s["epoch"] for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())].count(2) == len(steps)
    assert json.loads((out / "run.json").read_text())["init"]["head_replaced"]["classes"] == 3
    code, _, err = cli(capsys, *[a for a in argv if a != "--augment"], "--epochs", "3", "--out", out, "--resume")
    assert code == 2 and "other settings (augment)" in err
    make_folder(pictures, {"circle": 12}, seed=9)  # the user's files changed
    code, _, err = cli(capsys, *argv, "--epochs", "3", "--out", out, "--resume")
    assert code == 2 and "trained on other folder data" in err


@pytest.mark.torch
def test_cifar10_trains_and_the_classes_must_match(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from tests.helpers import get_adapter

    get_adapter("torch", request.config)
    cifar = make_cifar(tmp_path / "cifar", per_file=8)
    config = PARITY_CASE.replace(in_channels=3)
    settings = TrainSettings(
        backend="torch", epochs=1, batch_size=8, lr=0.05, resize=32, config=config, dataset="cifar10", augment=True
    )
    metrics = train(settings, tmp_path / "run", data_dir=cifar, progress=False)
    assert len(metrics) == 1 and np.isfinite(metrics[0]["train_loss"])
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert recorded["name"] == "cifar10" and set(recorded["files"]) == {f"data_batch_{i}.bin" for i in range(1, 6)} | {
        "test_batch.bin"
    }
    pictures = make_folder(tmp_path / "pics", {"a": 3, "b": 3, "c": 3, "d": 3})
    folder = TrainSettings(backend="torch", resize=32, config=config, dataset="folder", val_fraction=0.3)
    with pytest.raises(TrainingError, match=r"folder has 4 classes \(a, b, c, d\), .*pass --num-classes 4"):
        train(folder, tmp_path / "run2", data_dir=pictures, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not data.DEBIAN_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_four_backends_train_in_lockstep_from_one_file_with_augmentation(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``--init`` from one file, ``--augment``, the same seed, real Fashion-MNIST: the first 20
    per-step losses of every backend match the float64 oracle trained on the same batches, and
    each other, within the parity suite's lockstep bound (errors scaled by the largest loss)."""
    names = participating_backends(request.config)
    if len(names) < 2:
        pytest.skip("needs at least two backends")
    init = tmp_path / "w0.safetensors"
    save_weights(init, init_canonical(PARITY_CASE, 7), PARITY_CASE, source="numpy-init")
    losses = {}
    for name in names:
        settings = TrainSettings(
            backend=name, epochs=1, batch_size=8, lr=0.01, resize=32, limit=160, test_limit=8, seed=3,
            config=PARITY_CASE, augment=True, init=str(init),
        )  # fmt: skip
        train(settings, tmp_path / name, data_dir=data.DEBIAN_DIR, progress=False)
        steps = (tmp_path / name / "steps.jsonl").read_text().splitlines()
        losses[name] = np.array([json.loads(line)["loss"] for line in steps])
        assert len(losses[name]) == 20
    split = data.subset(data.load("train", data.DEBIAN_DIR), 160)
    batches = list(data.batches(split, 8, 32, seed=3, epoch=0, augment=True))
    plain = list(data.batches(split, 8, 32, seed=3, epoch=0))
    assert not np.array_equal(batches[0][0], plain[0][0])  # augmentation is on
    oracle = np.array(reference_grad.sgd_steps(PARITY_CASE, load_weights(init)[1], batches, 0.01)[0])
    assert oracle[-5:].mean() < oracle[:5].mean()  # it really trains
    scale = float(np.max(np.abs(oracle)))
    for name in names:
        error = np.max(np.abs(losses[name] - oracle)) / scale
        assert error <= bound("lockstep", "float32"), (name, error)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            error = np.max(np.abs(losses[a] - losses[b])) / scale
            assert error <= bound("lockstep", "float32", pairwise=True), (a, b, error)


@pytest.mark.torch
def test_evaluate_feeds_a_colour_network_grey_images_repeated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    """A network fine-tuned on Fashion-MNIST from a 3-channel file evaluates on it too."""
    from tests.helpers import get_adapter
    from tests.test_data import make_dataset

    get_adapter("torch", request.config)
    dataset = make_dataset(tmp_path / "fmnist", n_train=16, n_test=16)
    colour = PARITY_CASE.replace(in_channels=3)
    path = tmp_path / "colour.safetensors"
    save_weights(path, init_canonical(colour, 0), colour)
    code, out, err = cli(
        capsys, "evaluate", "--weights", path, "--backend", "torch", "--data-dir", dataset, "--resize", 32, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["images"] == 16 and json.loads(out)["config"]["in_channels"] == 3


@pytest.mark.torch
def test_evaluate_reads_the_image_folder_a_run_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    """`densenet evaluate --dataset folder` judges the weights on the validation images training
    judged them on (its recorded --val-fraction), with the accuracy training recorded."""
    import os
    import subprocess
    import sys

    from tests.helpers import get_adapter

    get_adapter("torch", request.config)
    root = Path(__file__).resolve().parents[1]
    pictures = make_folder(tmp_path / "pics", {"circle": 10, "square": 10, "star": 10}, mode="L")
    out = tmp_path / "run"
    argv = ["train", "--backend", "torch", "--dataset", "folder", "--data-dir", str(pictures), "--num-classes", "3"]
    argv += [
        "--val-fraction",
        "0.3",
        "--resize",
        "32",
        "--batch-size",
        "4",
        "--epochs",
        "6",
        "--lr",
        "0.05",
    ]  # learns: 0.67
    argv += [
        "--num-channels",
        "8",
        "--growth-rate",
        "8",
        "--arch",
        "2,2",
        "--quiet",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "common", *argv], capture_output=True, text=True, cwd=root, env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["threads"] == 1  # the count the run computed with, recorded
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    weights = out / "weights.safetensors"
    evaluate = ["evaluate", "--weights", weights, "--backend", "torch", "--dataset", "folder", "--data-dir", pictures]
    code, stdout, err = cli(capsys, *evaluate, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["images"] == info["data"]["val_images"] == 9 and result["split"] == "val"
    assert "0.3 of each class" in result["split_from"] and "the file's training settings" in result["split_from"]
    assert result["test_acc"] == last["test_acc"]
    assert result["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    # Another split is another judgement: --val-fraction overrides the recorded one.
    code, stdout, err = cli(capsys, *evaluate, "--val-fraction", "0.5", "--json")
    assert code == 0, err
    assert json.loads(stdout)["images"] == 15
    # Data of other classes than the head predicts is refused, naming both.
    other = make_folder(tmp_path / "two", {"a": 4, "b": 4}, mode="L")
    code, _, err = cli(capsys, *evaluate[:-1], other)
    assert code == 2 and "which predicts 3 classes; folder in" in err and "has 2 (a, b)" in err, err
