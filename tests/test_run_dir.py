"""The run directory: one writer at a time, leftovers of interrupted writes, what a failed write
says, and what ``--resume`` with another ``--epochs`` does."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from common.training import rundir as rundir_module
from common.training.run import train
from common.training.rundir import LOCK_FILE, RunDir, RunDirBusy, RunWriteError
from common.training.settings import TrainingError
from common.weights.canonical import load_canonical
from tests.helpers import run_cli as cli
from tests.test_train import SMALL, settings

ROOT = Path(__file__).resolve().parents[1]
# `densenet train` of the small network as the tests of tests/test_train.py train it.
_TRAIN = (
    *("train", "--backend", "torch", "--batch-size", "32", "--lr", "0.1", "--resize", "32", "--quiet"),
    *("--num-channels", "16", "--growth-rate", "16", "--arch", "2,2"),
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "fmnist", n_train=128, n_test=64)


# ------------------------------------------------------------------------------------------------
# the lock


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunDir(out).locked():
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(
            RunDirBusy, match=rf"{out} is being written by another densenet process \(pid {os.getpid()}\)"
        ):
            with RunDir(out).locked():
                pass
    # Released: the next writer gets it, and a directory the lock made and left empty is gone.
    assert not out.exists()
    with RunDir(out).locked():
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from common.training.rundir import RunDir\n"
            "with RunDir(sys.argv[1]).locked():\n    print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            with RunDir(out).locked():
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert (out / LOCK_FILE).is_file()  # left behind by the killed holder
        with RunDir(out).locked():
            assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_leftovers_of_interrupted_writes_are_removed_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    ours = [out / ".checkpoint.safetensors.0123456789ab.tmp", out / ".metrics.jsonl.tmp", out / ".steps.jsonl.tmp"]
    theirs = [out / ".notes.tmp", out / "notes.txt"]
    for path in ours + theirs:
        path.write_text("x")
    with RunDir(out).locked():
        assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)
    assert not (out / LOCK_FILE).exists()


def test_a_launchers_lock_covers_its_workers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    launcher = RunDir(out)
    with launcher.locked():
        env = launcher.lock_env()
        # A process whose ancestor holds the lock (a worker) writes under it ...
        code = (
            "import sys; from common.training.rundir import RunDir\n"
            "with RunDir(sys.argv[1]).locked():\n    print('worker writes')"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(out)], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
        )
        assert done.stdout.strip() == "worker writes", done.stderr
        # ... anyone else naming the same holder is still refused.
        monkeypatch.setenv(rundir_module.LOCK_ENV, f"{os.getpid() + 1_000_000}:{out.resolve()}")
        with pytest.raises(RunDirBusy):
            with RunDir(out).locked():
                pass


@pytest.mark.torch
@pytest.mark.slow
def test_two_trains_into_one_out_give_one_run_and_one_refusal(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "dup"
    argv = [sys.executable, "-m", "common", "train", "--backend", "torch", "--epochs", "2", "--batch-size", "32"]
    argv += ["--resize", "32", "--num-channels", "16", "--growth-rate", "16", "--arch", "2,2", "--quiet"]
    argv += ["--out", str(out), "--data-dir", str(dataset)]
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        out1, err1 = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait(timeout=10)
    assert first.returncode == 0, err1
    assert second.returncode == 2, second.stderr
    assert f"is being written by another densenet process (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------
# a write that fails


@pytest.mark.torch
def test_a_full_disk_names_the_file_and_what_is_safe(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    real = rundir_module.save_weights
    calls = []

    def save_weights(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second epoch's checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rundir_module, "save_weights", save_weights)
    with pytest.raises(RunWriteError) as info:
        train(settings("torch", epochs=3), out, data_dir=dataset, progress=False)
    message = str(info.value)
    assert info.value.exit_status == 2  # the user's environment
    assert f"cannot write {out / 'checkpoint.safetensors'} (No space left on device)" in message
    assert "holds the weights after epoch 1, intact; continue with the same command and --resume" in message
    monkeypatch.setattr(rundir_module, "save_weights", real)
    metrics = train(settings("torch", epochs=3), out, data_dir=dataset, resume=True, progress=False)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# --resume with another --epochs


@pytest.mark.torch
def test_resume_of_a_finished_run_says_it_is_finished(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(settings("torch", epochs=1), out, data_dir=dataset, progress=False)
    with pytest.raises(TrainingError, match=r"--resume: the run in .* is finished \(all 1 epochs"):
        train(settings("torch", epochs=1), out, data_dir=dataset, resume=True, progress=False)


@pytest.mark.torch
def test_resume_with_fewer_epochs_than_done_is_refused(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(settings("torch", epochs=2), out, data_dir=dataset, progress=False)
    with pytest.raises(TrainingError, match="--resume --epochs 1: .* already holds epoch 2; give --epochs above 2"):
        train(settings("torch", epochs=1), out, data_dir=dataset, resume=True, progress=False)


@pytest.mark.torch
def test_resume_never_stretches_a_cosine_schedule(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(settings("torch", epochs=2, lr_schedule="cosine"), out, data_dir=dataset, progress=False)
    with pytest.raises(TrainingError, match="cosine schedule was laid over 2 epochs; over 4 the rate of step 2"):
        train(settings("torch", epochs=4, lr_schedule="cosine"), out, data_dir=dataset, resume=True, progress=False)
    # The run is as it was.
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.torch
def test_resume_extends_a_constant_rate(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(settings("torch", epochs=1), out, data_dir=dataset, progress=False)
    longer = train(settings("torch", epochs=2), out, data_dir=dataset, resume=True, progress=False)
    assert [m["epoch"] for m in longer] == [1, 2]
    assert longer[0] == first[0]
    whole = train(settings("torch", epochs=2), tmp_path / "whole", data_dir=dataset, progress=False)
    assert longer[-1]["train_loss"] == pytest.approx(whole[-1]["train_loss"], abs=1e-6)


@pytest.mark.torch
def test_resume_cli_says_finished(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    train(settings("torch", epochs=1), out, data_dir=dataset, progress=False)
    code, _, err = cli(
        capsys,
        *("train", "--backend", "torch", "--epochs", "1", "--batch-size", "32", "--lr", "0.1", "--resize", "32"),
        *("--num-channels", str(SMALL.num_channels), "--growth-rate", str(SMALL.growth_rate), "--arch", "2,2"),
        *("--out", out, "--data-dir", dataset, "--resume", "--quiet"),
    )
    assert code == 2 and "is finished" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# a real full disk: a small tmpfs


@contextmanager
def _tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``path`` (root on Linux; skipped elsewhere, saying why)."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); it needs root on Linux")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture(scope="module")
def sizes(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """The size of each file of a one-epoch run of the small network, to size the disks below."""
    out = tmp_path_factory.mktemp("sizes") / "run"
    train(settings("torch", epochs=1), out, data_dir=dataset, progress=False)
    return {p.name: p.stat().st_size for p in out.iterdir()}


@pytest.mark.torch
def test_a_disk_full_before_the_first_checkpoint_leaves_nothing(
    dataset: Path, tmp_path: Path, sizes: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    small = sizes["run.json"] + sizes["metrics.jsonl"] + sizes["steps.jsonl"] + 16 * 1024
    assert small < sizes["checkpoint.safetensors"]
    with _tmpfs(tmp_path / "disk", small) as disk:
        out = disk / "run"
        code, _, err = cli(capsys, *_TRAIN, "--epochs", "2", "--out", out, "--data-dir", dataset)
        assert code == 2, err
        assert f"cannot write {out / 'checkpoint.safetensors'} (No space left on device)" in err
        assert "no epoch finished, so nothing was kept" in err and "start again with the same command" in err
        assert "Traceback" not in err and "internal error" not in err
        assert not out.exists()  # nothing half-written: no run.json without a checkpoint, no .tmp


@pytest.mark.torch
def test_a_disk_full_later_keeps_the_last_checkpoint_and_resume_goes_on(
    dataset: Path, tmp_path: Path, sizes: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    # Room for one checkpoint and the text files, not for the second checkpoint's temporary copy.
    room = int(1.5 * sizes["checkpoint.safetensors"]) + 3 * (sizes["steps.jsonl"] + sizes["metrics.jsonl"]) + 16384
    with _tmpfs(tmp_path / "disk", room) as disk:
        out = disk / "run"
        code, _, err = cli(capsys, *_TRAIN, "--epochs", "3", "--out", out, "--data-dir", dataset)
        assert code == 2, err
        assert f"cannot write {out / 'checkpoint.safetensors'} (No space left on device)" in err
        assert "holds the weights after epoch 1, intact; continue with the same command and --resume" in err
        assert not list(out.glob(".*.tmp"))
        subprocess.run(["mount", "-o", f"remount,size={8 * room}", str(disk)], check=True)
        code, _, err = cli(capsys, *_TRAIN, "--epochs", "3", "--out", out, "--data-dir", dataset, "--resume")
        assert code == 0, err
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.torch
@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_loses_nothing(dataset: Path, tmp_path: Path) -> None:
    """SIGKILL while the second checkpoint is half written: the first loads, the leftover
    temporary file is removed at the next start, and --resume ends where an unbroken run does."""
    out = tmp_path / "run"
    script = (
        "import os, signal, sys\n"
        "from common.training import rundir\n"
        "from common.cli import main\n"
        "real, calls = rundir.save_weights, []\n"
        "def save_weights(path, *a, **k):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 2:\n"
        "        tmp = path.with_name(f'.{path.name}.0123456789ab.tmp')\n"
        "        tmp.write_bytes(path.read_bytes()[: path.stat().st_size // 2])\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, *a, **k)\n"
        "rundir.save_weights = save_weights\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    # One thread everywhere: the runs must add up their sums in the same order to match bit for bit.
    argv = [str(a) for a in (*_TRAIN, "--epochs", "3", "--out", out, "--data-dir", dataset, "--threads", "1")]
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list(out.glob(".checkpoint.safetensors.*.tmp"))
    assert load_canonical(out / "checkpoint.safetensors").metadata["epoch"] == "1"
    resumed = subprocess.run(
        [sys.executable, "-m", "common", *argv, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_FILE).exists()
    whole = tmp_path / "whole"
    argv[argv.index(str(out))] = str(whole)
    unbroken = subprocess.run(
        [sys.executable, "-m", "common", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert unbroken.returncode == 0, unbroken.stderr
    a = load_canonical(whole / "weights.safetensors").weights
    b = load_canonical(out / "weights.safetensors").weights
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
