"""Ordinary mistakes at the command line: one clear line on stderr, the right exit status (2 for a
bad argument or input file, 1 for a failure, 130 for Ctrl-C), no traceback, and no file lost.

``test_bad_arguments_never_show_a_traceback`` runs every subcommand with a table of bad
arguments; the tests after it pin the cases that need more than a table row.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import common.cli
from common.cli import build_parser, main
from common.config import DenseNetConfig
from common.weights.canonical import init_canonical, save_weights
from common.weights.safetensors_io import read_weights, write_weights
from tests.helpers import run_cli as run
from tests.test_data import make_dataset

ROOT = Path(common.cli.__file__).parents[2]
TINY = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
TINY_ARGS = ["--num-channels", "8", "--growth-rate", "4", "--arch", "2,2"]


def assert_one_clear_error(code: int, err: str, expected: int, *fragments: str) -> None:
    """Exit status ``expected``; on stderr one ``densenet ...:`` message (argparse puts its usage
    before it), no traceback, no internal error; each fragment in it."""
    assert code == expected, err
    assert "Traceback" not in err and "internal error" not in err, err
    messages = [line for line in err.splitlines() if line.startswith("densenet")]
    assert len(messages) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a digest of its bytes: what a failed command must not change."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """Files and directories a user might name, right and wrong."""
    dataset = make_dataset(tmp_path / "fmnist", n_train=64, n_test=64)
    partial = make_dataset(tmp_path / "partial", n_train=64, n_test=64)
    (partial / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "empty").mkdir()
    (tmp_path / "plain.txt").write_text("a user's file\n")
    weights = tmp_path / "tiny.safetensors"
    save_weights(weights, init_canonical(TINY, 0), TINY, source="numpy-init")
    classes3 = tmp_path / "classes3.npz"
    save_weights(classes3, init_canonical(TINY.replace(num_classes=3), 0), TINY.replace(num_classes=3))
    negative = tmp_path / "negative.safetensors"
    bad = init_canonical(TINY, 0)
    bad["dense1.conv2.bn.running_var"] = bad["dense1.conv2.bn.running_var"].copy()
    bad["dense1.conv2.bn.running_var"][3] = -0.5
    tensors, metadata = read_weights(weights)
    write_weights({**tensors, "dense1.conv2.bn.running_var": bad["dense1.conv2.bn.running_var"]}, negative, metadata)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"settings": {"backend": "mxnet"}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    line = {"epoch": 1, "train_loss": 1.0, "test_loss": 1.0, "test_acc": 0.5}
    (truncated / "metrics.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line)[:20])
    pictures = tmp_path / "pictures"  # an image folder with one file that is no image
    for part in ("train", "val"):
        for name in ("a", "b"):
            (pictures / part / name).mkdir(parents=True)
            (pictures / part / name / "ok.png").write_bytes(_PNG)
    (pictures / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    return {
        "tmp": tmp_path,
        "data": dataset,
        "pictures": pictures,
        "partial": partial,
        "empty": tmp_path / "empty",
        "missing": tmp_path / "does-not-exist",
        "file": tmp_path / "plain.txt",
        "weights": weights,
        "negative": negative,
        "classes3": classes3,
        "run": run_dir,
        "truncated": truncated,
    }


# A 1x1 grey PNG (written by Pillow), so the table needs no image library to build its world.
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c636800000082008177cd72b60000000049454e44ae426082"
)


# (argv with {placeholders} from `world`, exit status, a fragment of the message)
NEW_RUN = ["train", "--backend", "torch", "--out", "{tmp}/new"]
BAD_ARGUMENTS = [
    (["list", "--bogus"], 2, "unrecognized arguments"),
    (["compare", "--seed", "-1"], 2, "expected a seed from 0 to 4294967295, got -1"),
    (["compare", "--seed", "1.5"], 2, "argument --seed"),
    (["compare", "--arch", "4,,4"], 2, "'4,,4' (an empty item)"),
    (["compare", "--arch", "4,4,"], 2, "an empty item"),
    (["compare", "--arch", "4,x"], 2, "argument --arch"),
    (["compare", "--input-size", "64x"], 2, "expected a size like 96 or 96x64, got '64x'"),
    (["compare", "--input-size", "x64"], 2, "argument --input-size"),
    (["compare", "--input-size", "0"], 2, "argument --input-size"),
    (["compare", "--backends", ","], 2, "an empty item"),
    (["compare", "--backends", ""], 2, "no backend named"),
    (["compare", "--backends", "torch,torch"], 2, "named twice"),
    (["compare", "--backends", "caffe"], 2, "unknown backend 'caffe'"),
    (["compare", "--input-size", "100000"], 2, "this machine has"),
    (["compare", "--batch-size", "0"], 2, "argument --batch-size"),
    (["compare", "--growth-rate", "x"], 2, "argument --growth-rate"),
    (["compare", "--compression", "2"], 2, "compression must be in (0, 1]"),
    (["compare", "--compression", "nan"], 2, "argument --compression"),
    (["compare", "--config", "nope"], 2, "unknown configuration 'nope'"),
    (["compare", "--dtype", "float16"], 2, "argument --dtype"),
    (["compare", "--threads", "x"], 2, "argument --threads: expected a thread count from 1 to 1024, got 'x'"),
    (["summary"], 2, "--backend"),
    (["summary", "--backend", "caffe"], 2, "unknown backend"),
    (["summary", "--backend", "torch", "--seed", "-1"], 2, "argument --seed"),
    (["summary", "--backend", "torch", "--input-size", "100000"], 2, "100000x100000 images in batches of 1"),
    (["summary", "--backend", "torch", "--input-size", "28"], 2, "too small"),
    (["summary", "--backend", "torch", "--growth-rate", "100000"], 2, "TB of weights); this machine has"),
    (["summary", "--backend", "torch", "--threads", "0"], 2, "argument --threads: expected a thread count from 1"),
    (["parity", "--seed", "-1"], 2, "argument --seed"),
    (["parity", "--seeds", "3-1"], 2, "an empty range"),
    (["parity", "--seeds", "0,,1"], 2, "an empty item"),
    (["parity", "--seeds", "-1"], 2, "argument --seeds"),
    (["parity", "--lr", "inf"], 2, "expected a finite number above 0, got inf"),
    (["parity", "--lr", "0"], 2, "argument --lr"),
    (["parity", "--steps", "0"], 2, "argument --steps"),
    (["parity", "--backends", ","], 2, "an empty item"),
    (["parity", "--input-size", "100000", "--batch-size", "8"], 2, "this machine has"),
    (["parity-sweep", "--seeds", "x"], 2, "argument --seeds"),
    (["parity-sweep", "--threads", "0"], 2, "argument --threads"),
    (["parity-sweep", "--onednn", "maybe"], 2, "argument --onednn"),
    (["parity-sweep", "--", "--seed", "-1"], 2, "argument --seed"),
    (["parity-sweep", "--", "--lr", "nan"], 2, "argument --lr"),
    (["parity-sweep", "--", "--seeds", "1"], 2, "give --seeds before --"),
    (["train"], 2, "--backend"),
    (["train", "--backend", "caffe"], 2, "unknown backend"),
    (["train", "--backend", "torch", "--seed", "-1"], 2, "argument --seed"),
    (["train", "--backend", "torch", "--lr", "inf"], 2, "argument --lr: expected a finite number above 0"),
    (["train", "--backend", "torch", "--lr", "nan"], 2, "argument --lr"),
    (["train", "--backend", "torch", "--lr", "-1"], 2, "argument --lr"),
    (["train", "--backend", "torch", "--epochs", "0"], 2, "argument --epochs"),
    (["train", "--backend", "torch", "--threads", "1025"], 2, "argument --threads"),
    (["train", "--backend", "torch", "--workers", "2", "--memory-efficient"], 2, "--memory-efficient trains in one"),
    (["train", "--backend", "torch", "--workers", "2", "--sync-bn"], 2, "SyncBatchNorm runs on GPUs only"),
    (["train", "--backend", "torch", "--out", "{file}"], 2, "is a file, not a directory"),
    (["train", "--backend", "torch", "--out", "{file}/run"], 2, "is not a directory this user can write in"),
    (["train", "--backend", "torch", "--out", "{run}"], 2, "already holds a mxnet run of 1 epoch(s)"),
    (["train", "--backend", "torch", "--out", "{empty}", "--resume"], 2, "checkpoint.safetensors does not exist"),
    (["train", "--backend", "torch", "--out", "{run}", "--resume", "--overwrite"], 2, "give one of them"),
    (["train", "--backend", "torch", "--out", "{tmp}/new", "--data-dir", "{missing}"], 2, "does not exist"),
    (["train", "--backend", "torch", "--out", "{tmp}/new", "--data-dir", "{empty}"], 2, "lacks 4 of the 4"),
    (["train", "--backend", "torch", "--out", "{tmp}/new", "--data-dir", "{partial}"], 2, "t10k-images-idx3"),
    (["train", "--backend", "torch", "--out", "{tmp}/new", "--data-dir", "{file}"], 2, "is not a directory"),
    (["train", "--backend", "torch", "--out", "{tmp}/new", "--resize", "4"], 2, "too small"),
    (["train", "--backend", "torch", "--out", "{tmp}/new", "--num-classes", "5"], 2, "pass --num-classes 10"),
    ([*NEW_RUN, "--init", "{missing}.safetensors"], 2, "file not found"),
    (
        [*NEW_RUN, "--init", "{weights}", "--arch", "2,2,2", "--data-dir", "{data}"],
        2,
        "arch: file has 2,2, network has",
    ),
    ([*NEW_RUN, "--init", "{weights}", "--in-channels", "3", "--data-dir", "{data}"], 2, "in_channels: file has 1"),
    ([*NEW_RUN, "--init", "{weights}", "--init-format", "caffe"], 2, "argument --init-format"),
    ([*NEW_RUN, "--init", "{weights}", "--init-format", "keras"], 2, "do not look like keras DenseNet weights"),
    ([*NEW_RUN, "--dataset", "cifar10"], 2, "needs --data-dir"),
    ([*NEW_RUN, "--dataset", "cifar10", "--data-dir", "{empty}"], 2, "lacks 6 of the 6 CIFAR-10 binary files"),
    ([*NEW_RUN, "--dataset", "imagenet"], 2, "argument --dataset: invalid choice"),
    ([*NEW_RUN, "--dataset", "folder", "--data-dir", "{missing}"], 2, "does not exist"),
    ([*NEW_RUN, "--dataset", "folder", "--data-dir", "{empty}"], 2, "holds no class folders"),
    ([*NEW_RUN, "--dataset", "folder", "--data-dir", "{pictures}"], 2, "broken.png (not an image Pillow recognises)"),
    ([*NEW_RUN, "--val-fraction", "1.5"], 2, "argument --val-fraction"),
    ([*NEW_RUN, "--augment-padding", "2"], 2, "padding needs augmentation on (--augment)"),
    ([*NEW_RUN, "--augment", "--augment-padding", "-1"], 2, "argument --augment-padding: expected an integer of 0"),
    ([*NEW_RUN, "--augment", "--augment-padding", "97"], 2, "must be 0 to the image side (96) pixels, got 97"),
    ([*NEW_RUN, "--val-fraction", "0.2"], 2, "--val-fraction splits an image folder"),
    (["train", "--backend", "torch", "--out", "{tmp}/new", "--batch-size", "100000000"], 2, "this machine has"),
    (["evaluate", "--backend", "torch"], 2, "--weights"),
    (["evaluate", "--weights", "{missing}.safetensors", "--backend", "torch"], 2, "file not found"),
    (["evaluate", "--weights", "{file}", "--backend", "torch"], 2, "unsupported weight file suffix"),
    (["evaluate", "--weights", "{negative}", "--backend", "torch"], 2, "dense1.conv2.bn.running_var"),
    (["evaluate", "--weights", "{weights}", "--backend", "caffe"], 2, "unknown backend"),
    (["evaluate", "--weights", "{weights}", "--backend", "torch", "--growth-rate", "8"], 2, "growth_rate"),
    (["evaluate", "--weights", "{classes3}", "--backend", "torch"], 2, "needs num_classes=10 and in_channels=1"),
    (["evaluate", "--weights", "{weights}", "--backend", "torch", "--resize", "0"], 2, "argument --resize"),
    (["evaluate", "--weights", "{weights}", "--backend", "torch", "--data-dir", "{partial}"], 2, "lacks 1 of"),
    (["evaluate", "--weights", "{weights}"], 2, "--backend is required"),
    (["evaluate", "--weights", "{weights}", "--runtime", "onnxruntime"], 2, "is not an export directory"),
    (["evaluate", "--weights", "{empty}", "--runtime", "onnxruntime"], 2, "holds no densenet-export.json"),
    (["evaluate", "--weights", "{weights}", "--runtime", "tvm"], 2, "argument --runtime: invalid choice"),
    (["export"], 2, "--backend"),
    (["export", "--backend", "caffe", "--weights", "{weights}", "--out", "{tmp}/e"], 2, "unknown backend"),
    (["export", "--backend", "torch", "--weights", "{missing}.safetensors", "--out", "{tmp}/e"], 2, "file not found"),
    (["export", "--backend", "torch", "--weights", "{weights}", "--out", "{tmp}"], 2, "exists; name a new directory"),
    (["export", "--backend", "torch", "--weights", "{weights}", "--out", "{missing}/e"], 2, "does not exist"),
    (
        ["export", "--backend", "torch", "--weights", "{weights}", "--out", "{tmp}/e", "--format", "tflite"],
        2,
        "--format",
    ),
    (
        ["export", "--backend", "torch", "--weights", "{weights}", "--out", "{tmp}/e", "--input-size", "4"],
        2,
        "too small",
    ),
    (
        [
            "export",
            "--backend",
            "torch",
            "--weights",
            "{weights}",
            "--out",
            "{tmp}/e",
            "--format",
            "onnx-int8",
            "--check",
        ],
        2,
        "no float32 error model",
    ),  # fmt: skip
    (["data-speed", "--data-dir", "{missing}"], 2, "does not exist"),
    (["data-speed", "--data-dir", "{empty}"], 2, "lacks 4 of the 4"),
    (["data-speed", "--batch-size", "x"], 2, "argument --batch-size"),
    (["plot"], 2, "RUN_DIR"),
    (["plot", "{missing}", "--out", "{tmp}/c.png"], 2, "is not a run directory"),
    (["plot", "{empty}", "--out", "{tmp}/c.png"], 2, "metrics.jsonl does not exist"),
    (["plot", "{truncated}", "--out", "{tmp}/c.png"], 2, "line 2 is not valid JSON"),
    (["plot", "{run}", "--out", "{tmp}/c.png"], 2, "line 1 is not an epoch's metrics"),
    (["plot", "{truncated}", "--out", "{missing}/c.png"], 2, "does not exist"),
    (["plot", "{truncated}", "--out", "{empty}"], 2, "is a directory"),
    (["bench", "--steps", "0"], 2, "argument --steps"),
    (["bench", "--backends", "caffe"], 2, "unknown backend 'caffe'"),
    (["bench", "--modes", "fast"], 2, "unknown mode 'fast'"),
    (["bench", "--modes", "eager,,jit"], 2, "an empty item"),
    (["bench", "--backends", "torch", "--modes", "xla"], 2, "no backend among torch"),
    (["bench", "--phases", "backward"], 2, "argument --phases"),
    (["bench", "--input-size", "100000"], 2, "this machine has"),
    (["bench", "--plot", "{missing}/b.png"], 2, "name a PNG file in an existing directory"),
    (["golden", "--check", "--dir", "{missing}"], 2, "nothing to check"),
    (["golden", "--dir", "{file}"], 2, "is a file"),
    (["init"], 2, "--out"),
    (["init", "--out", "{tmp}/w.safetensors", "--seed", "-1"], 2, "argument --seed"),
    (["init", "--out", "{tmp}/w.pt"], 2, "unsupported weight file suffix"),
    (["init", "--out", "{missing}/w.npz"], 2, "cannot write"),
    (["init", "--out", "{tmp}/w.npz", "--arch", "2,,2"], 2, "an empty item"),
    (["convert", "--from", "{missing}.npz", "--to", "{tmp}/o.npz"], 2, "file not found"),
    (["convert", "--from", "{weights}", "--to", "{weights}"], 2, "is the input file"),
    (["convert", "--from", "{weights}", "--to", "{tmp}/o.npz", "--to-format", "caffe"], 2, "unknown format"),
    (["convert", "--from", "{weights}", "--to", "{tmp}/o.npz", "--backend", ","], 2, "an empty item"),
    (["convert", "--from", "{weights}", "--to", "{tmp}/o.npz", "--backend", "torch,,jax"], 2, "an empty item"),
    (["convert", "--from", "{weights}", "--to", "{tmp}/o.npz", "--config", "densenet121"], 2, "different network"),
    (["convert", "--from", "{weights}", "--to", "{empty}"], 2, "unsupported weight file suffix"),
    (["convert", "--from", "{weights}", "--to", "{missing}/o.npz"], 2, "does not exist"),
    (["convert", "--from", "{weights}", "--to", "{tmp}/o.npz", "--from-format", "gluon"], 2, "Gluon"),
    (["teach"], 2, "--out"),
    (["teach", "--out", "{file}"], 2, "is a file"),
    (["teach", "--out", "{partial}"], 2, "holds no earlier `densenet teach` site"),
    (["teach", "--out", "{file}/site"], 2, "cannot create the directory"),
    (["teach", "--out", "{tmp}/site", "--parity", "{missing}.json"], 2, "no such results file"),
    (["notebooks", "--bogus"], 2, "unrecognized arguments"),
    (["exercise"], 2, "EXERCISE"),
    (["exercise", "nope"], 2, "invalid choice: 'nope'"),
    (["exercise", "pooling", "--epochs", "0"], 2, "argument --epochs"),
]


def _ids() -> list[str]:
    return [f"{i:02d}-{' '.join(argv)[:40]}" for i, (argv, _, _) in enumerate(BAD_ARGUMENTS)]


@pytest.mark.parametrize(("argv", "status", "fragment"), BAD_ARGUMENTS, ids=_ids())
def test_bad_arguments_never_show_a_traceback(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], status: int, fragment: str
) -> None:
    before = snapshot(world["tmp"])
    code, _, err = run(capsys, *(a.format(**world) for a in argv))
    assert_one_clear_error(code, err, status, fragment)
    assert snapshot(world["tmp"]) == before  # nothing written, nothing lost


def test_every_subcommand_is_in_the_table() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {argv[0] for argv, _, _ in BAD_ARGUMENTS}


def test_a_bad_argument_in_a_fresh_process() -> None:
    """What a person sees: the real interpreter, the real exit status."""
    proc = subprocess.run(
        [sys.executable, "-m", "common", "summary", "--backend", "torch", "--input-size", "100000"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert_one_clear_error(proc.returncode, proc.stderr, 2, "needs about", "of memory")


# ------------------------------------------------------------------------------------------------
# Ctrl-C: exit 130 and a message that says what is true


@pytest.mark.parametrize(
    ("argv", "target", "fragment"),
    [
        (["evaluate", "--weights", "{weights}", "--backend", "torch"], "common.cli.training.load_canonical", ""),
        (["compare"], "common.cli.inspection.compare_shapes", ""),
        (["parity"], "common.cli.parity.run_parity", ""),
        (["summary", "--backend", "torch"], "common.cli.inspection.summarize", ""),
        (
            ["convert", "--from", "{weights}", "--to", "{tmp}/out.npz"],
            "common.cli.weights.load_canonical",
            "nothing written to",
        ),
    ],
)
def test_ctrl_c_exits_130_with_one_line(
    world: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    target: str,
    fragment: str,
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    before = snapshot(world["tmp"])
    code, _, err = run(capsys, *(a.format(**world) for a in argv))
    assert_one_clear_error(code, err, 130, "interrupted", fragment)
    assert snapshot(world["tmp"]) == before


def test_an_unexpected_error_is_one_line_unless_asked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args, **kwargs):
        raise RuntimeError("Traceback (most recent call last):\n  File x\nCheck failed: something broke")

    monkeypatch.setattr("common.cli.inspection.compare_shapes", bug)
    code, _, err = run(capsys, "compare")
    assert code == 1
    assert err.strip().splitlines() == [
        "densenet compare: internal error: RuntimeError: Check failed: something broke "
        "(DENSENET_TRACEBACK=1 shows where; please report it)"
    ]
    monkeypatch.setenv("DENSENET_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["compare"])


def test_an_os_error_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/somewhere/out.npz")

    monkeypatch.setattr("common.cli.inspection.compare_shapes", full)
    code, _, err = run(capsys, "compare")
    assert_one_clear_error(code, err, 1, "/somewhere/out.npz: No space left on device")


# ------------------------------------------------------------------------------------------------
# Options: --version, defaults in --help, strict parsing


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.startswith("densenet-suite ")


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("train", ["--batch-size BATCH_SIZE", "(default: 128)", "(default: 0.01)", "(default: 96)", "--test-limit"]),
        ("compare", ["(default: 96x96)", "(default: float32)"]),
        ("parity", ["(default: 32x32)", "(default: 20)"]),
        ("evaluate", ["(default: 256)", "the file's training resize"]),
    ],
)
def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str], command: str, shown: list[str]) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    for fragment in shown:
        assert " ".join(fragment.split()) in text, fragment
    assert "(default: None)" not in text


def test_strict_values_that_are_fine(capsys: pytest.CaptureFixture[str]) -> None:
    from common.cli.options import _arch, _input_size, backend_list, seed_range

    assert _arch("4,4,4,4") == _arch("(4, 4, 4, 4)") == (4, 4, 4, 4)
    assert _input_size("64") == (64, 64) and _input_size("64x48") == _input_size("64,48") == (64, 48)
    assert backend_list("all") is None and backend_list(None) is None
    assert backend_list("pytorch, keras") == ["torch", "tf"]
    assert seed_range("0-3") == [0, 1, 2, 3] and seed_range("0,3,7") == [0, 3, 7]


# ------------------------------------------------------------------------------------------------
# densenet list: package metadata, no framework imported unless asked


def test_list_reads_package_metadata_without_importing_a_framework() -> None:
    code = (
        "import json, sys, io, contextlib; from common.cli import main; buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf): main(['list', '--json'])\n"
        "frameworks = ('torch', 'mxnet', 'jax', 'flax', 'tensorflow', 'keras', 'optax')\n"
        "imported = [m for m in frameworks if m in sys.modules]\n"
        "print(json.dumps({'rows': json.loads(buf.getvalue()), 'imported': imported}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["imported"] == []
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["torch", "mxnet", "jax", "tf"]
    for r in rows:
        assert r["checked"] is False and r["available"] == (r["reason"] is None)
        assert r["available"] == (r["version"] is not None)


def test_every_backend_names_its_distributions() -> None:
    from common import registry

    assert set(registry._DISTRIBUTIONS) == set(registry.BACKENDS)


def test_list_reports_a_missing_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    from common import registry

    real = metadata.version

    def version(name: str) -> str:
        if name == "optax":
            raise metadata.PackageNotFoundError(name)
        return real(name) if name != "flax" else "9.9"

    monkeypatch.setattr(registry.metadata, "version", version)
    jax = registry.installed(["flax"])[0]
    assert not jax.available
    assert jax.reason == "optax not installed; pip install 'densenet-suite[jax]'"


# ------------------------------------------------------------------------------------------------
# Weight files: another network's weights are summarised


def test_weights_of_another_network_are_summarised() -> None:
    from common.arch import canonical_spec
    from common.errors import WeightFileError
    from common.weights.canonical import check_weights

    d2l = DenseNetConfig()
    with pytest.raises(WeightFileError) as info:
        check_weights(canonical_spec(d2l), init_canonical(TINY, 0), source="weights")
    lines = str(info.value).splitlines()
    assert len(lines) < 20, str(info.value)
    assert lines[0] == "weights do not fit the network:"
    assert "they hold DenseNet num_channels=8 growth_rate=4 arch=2,2" in lines[1]
    assert "the network is DenseNet num_channels=64 growth_rate=32 arch=4,4,4,4" in lines[2]
    assert "growth_rate: weights have 4, network has 32" in str(info.value)
    assert "more problem(s)" in lines[-1]


def test_base_install_is_enough_for_the_cli() -> None:
    """The framework-neutral core imports only the base dependencies (numpy, safetensors),
    matplotlib only where curves are drawn, which degrades with a message without it, and Pillow
    only where an image folder is read (inside the function: the CLI starts without it)."""
    import ast

    import tomllib

    base = {
        re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0]
        for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert base == {"numpy", "safetensors"}
    third_party: dict[str, set[str]] = {}
    for path in (ROOT / "common").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "common":
                    third_party.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    # common/teach builds teaching material (the `teach` extra): Pygments, Jinja2 (with markupsafe)
    # for the site, jupytext for the notebooks, torch for the dense-MLP exercise; each is imported
    # inside the function that needs it.
    teaching = {k for k, files in third_party.items() if all(f.startswith("common/teach/") for f in files)}
    assert teaching <= {"pygments", "jinja2", "markupsafe", "jupytext", "torch", "matplotlib"}, teaching
    # common/deploy (the `deploy` extra): onnx and ONNX Runtime, each imported inside the function
    # that needs it, so `densenet --help` and every other command start without them.
    deploying = {k for k, files in third_party.items() if all(f.startswith("common/deploy/") for f in files)}
    assert deploying <= {"onnx", "onnxruntime"}, deploying
    assert set(third_party) - teaching - deploying <= base | {"matplotlib", "PIL"}, third_party
    outside = {f for f in third_party.get("matplotlib", set()) if not f.startswith("common/teach/")}
    assert outside <= {"common/training/plot.py"}
    assert third_party.get("PIL", set()) <= {"common/data/folder.py"}
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, common.cli; common.cli.build_parser(); "
            "print('PIL' in sys.modules or 'onnx' in sys.modules or 'onnxruntime' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert loaded.stdout.strip() == "False", loaded.stderr
