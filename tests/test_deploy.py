"""``densenet export``: every backend's ONNX and native artefact, loaded in a fresh process by its own
runtime, against the float64 oracle; the four ONNX files against each other; ONNX Runtime as an
evaluation runtime; int8; and what an export refuses or leaves behind."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from common.deploy import check as deploy_check
from common.deploy.export import MANIFEST, ExportError, export, read_manifest
from common.errors import InputError
from common.oracle import reference
from common.verify.parity import PARITY_CASE, bound
from common.weights.canonical import init_canonical, save_weights
from tests.helpers import get_adapter, participating_backends, required_backends
from tests.helpers import run_cli as cli
from tests.test_data import make_dataset

SIZE = 32  # the parity case's network at 32x32: small, yet every stage is more than 1x1


def _require(module: str, config: pytest.Config):
    """The deploy extra's ``module``: a failure when backends are required (CI), else a skip."""
    try:
        return __import__(module)
    except ImportError as exc:
        if required_backends(config):
            pytest.fail(f"{module} is not installed ({exc}): pip install -c constraints.txt -e '.[deploy]'")
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "parity.safetensors"
    save_weights(path, init_canonical(PARITY_CASE, 3), PARITY_CASE, source="tests/test_deploy.py")
    return path


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Path]:
    """Every participating backend's ONNX export of the same weights, made once."""
    _require("onnxruntime", request.config)
    root = tmp_path_factory.mktemp("onnx")
    weights = init_canonical(PARITY_CASE, 3)
    out = {}
    for name in participating_backends(request.config):
        adapter = get_adapter(name, request.config)
        export(adapter, PARITY_CASE, weights, "onnx", root / name, image_size=SIZE)
        out[name] = root / name
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt, threads", [("onnx", 1), ("native", 2)])
def test_every_artefact_matches_the_oracle_in_a_fresh_process(
    backend_name: str, adapter, fmt: str, threads: int, weights_file: Path, tmp_path: Path, request
) -> None:
    if fmt == "onnx":
        _require("onnxruntime", request.config)
    out = tmp_path / "export"
    manifest = export(adapter, PARITY_CASE, init_canonical(PARITY_CASE, 3), fmt, out, image_size=SIZE)
    assert read_manifest(out) == manifest
    channels_last = adapter.layout == "NHWC"
    expected_shape = [None, SIZE, SIZE, 1] if channels_last else [None, 1, SIZE, SIZE]
    assert manifest["input"]["shape"] == expected_shape and manifest["layout"] == adapter.layout
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}
    assert (manifest["opset"] is not None) == (fmt == "onnx")
    report = deploy_check.check_in_child(out, weights_file, threads)
    assert report["ok"], report
    assert [c["batch"] for c in report["cases"]] == list(deploy_check.BATCH_SIZES)
    for case in report["cases"]:
        # The float32 inference bound of docs/parity.md; exactly zero error would mean the check
        # compared the oracle with itself.
        assert 0 < case["error"] <= bound("inference", "float32"), case


@pytest.mark.slow
def test_the_onnx_files_of_the_frameworks_agree_with_each_other(onnx_exports: dict[str, Path]) -> None:
    from common.deploy.runtime import runner

    if len(onnx_exports) < 2:
        pytest.skip("fewer than two backends installed")
    limit = bound("inference", "float32", pairwise=True)
    for batch in deploy_check.BATCH_SIZES:
        X = deploy_check.seeded_images(PARITY_CASE, SIZE, batch, seed=1)
        logits = {n: runner(d, read_manifest(d), 1)(X) for n, d in onnx_exports.items()}
        for a, b in itertools.combinations(logits, 2):
            error = deploy_check.relative_error(logits[a], logits[b].astype(np.float64))
            assert error <= limit, (
                f"{a} and {b} differ by {error:.3g} of the scale at batch {batch} (bound {limit:.3g})"
            )


@pytest.mark.torch
def test_an_existing_out_is_refused_and_a_failed_export_leaves_nothing(tmp_path: Path, request, monkeypatch) -> None:
    adapter = get_adapter("torch", request.config)
    weights = init_canonical(PARITY_CASE, 0)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("a user's file")
    with pytest.raises(InputError, match="exists; name a new directory"):
        export(adapter, PARITY_CASE, weights, "onnx", taken, image_size=SIZE)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    with pytest.raises(InputError, match="too small"):
        export(adapter, PARITY_CASE, weights, "native", tmp_path / "small", image_size=4)

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter gave up\nwith a long C++ stack")

    monkeypatch.setattr(adapter.exporter(), "export_native", broken)
    with pytest.raises(ExportError, match="torch native export failed: RuntimeError: the exporter gave up$"):
        export(adapter, PARITY_CASE, weights, "native", tmp_path / "new", image_size=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging directory either


@pytest.mark.torch
@pytest.mark.slow
def test_cli_export_check_and_evaluate_with_onnxruntime(tmp_path: Path, capsys, request) -> None:
    _require("onnxruntime", request.config)
    get_adapter("torch", request.config)
    data = make_dataset(tmp_path / "fmnist", n_train=64, n_test=96)
    weights = tmp_path / "w.safetensors"
    save_weights(weights, init_canonical(PARITY_CASE, 0), PARITY_CASE, source="tests")
    out = tmp_path / "export"
    code, stdout, stderr = cli(
        capsys,
        "export",
        "--backend",
        "torch",
        "--weights",
        weights,
        "--out",
        out,
        "--input-size",
        SIZE,
        "--check",
        "--json",
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["check"]["ok"] and result["manifest"]["backend"] == "torch"
    code, stdout, stderr = cli(capsys, "export", "--backend", "torch", "--weights", weights, "--out", out)
    assert code == 2 and "exists; name a new directory" in stderr
    base = ["evaluate", "--weights", weights, "--backend", "torch", "--resize", SIZE, "--data-dir", data, "--json"]
    code, stdout, stderr = cli(capsys, *base)
    assert code == 0, stderr
    framework = json.loads(stdout)
    on_ort = ["evaluate", "--runtime", "onnxruntime", "--weights", out, "--data-dir", data, "--json"]
    code, stdout, stderr = cli(capsys, *on_ort)
    assert code == 0, stderr
    runtime = json.loads(stdout)
    assert runtime["runtime"] == "onnxruntime" and runtime["images"] == framework["images"] == 96
    assert runtime["test_acc"] == framework["test_acc"]
    # Losses agree to the float32 bound of their logits (the loss is smooth in them).
    assert abs(runtime["test_loss"] - framework["test_loss"]) <= 1e-4 * max(1.0, framework["test_loss"])
    code, _, stderr = cli(capsys, *on_ort[:-1], "--resize", SIZE + 8)
    assert code == 2 and f"takes {SIZE}x{SIZE} images" in stderr
    code, _, stderr = cli(capsys, "evaluate", "--runtime", "onnxruntime", "--weights", weights, "--data-dir", data)
    assert code == 2 and "not an export directory" in stderr
    code, _, stderr = cli(capsys, "export", "--backend", "torch", "--format", "onnx-int8", "--weights", weights,
                          "--out", tmp_path / "q", "--check")  # fmt: skip
    assert code == 2 and "no float32 error model" in stderr


# int8 (static, U8S8, per-channel weights): an 8-bit step is 2**-8 of a tensor's range. Measured
# on the parity case, calibrated on the inputs' own distribution: 2.4-8.5 steps of the logits'
# scale over seeds 0-15, the same with 1 and 2 threads; the bound is the power of two at least 5x
# above the worst.
INT8_BOUND = 64 * 2.0**-8


@pytest.mark.torch
@pytest.mark.slow
def test_int8_is_quantised_and_close_to_the_oracle(tmp_path: Path, request) -> None:
    onnx = _require("onnx", request.config)
    _require("onnxruntime", request.config)
    from common.deploy.runtime import runner

    adapter = get_adapter("torch", request.config)
    weights = init_canonical(PARITY_CASE, 1)
    calibration = np.random.default_rng(1).standard_normal((64, 1, SIZE, SIZE)).astype(np.float32)
    out = tmp_path / "int8"
    manifest = export(adapter, PARITY_CASE, weights, "onnx-int8", out, image_size=SIZE, calibration=calibration)
    assert manifest["quantization"]["calibration_images"] == 64
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.onnx"]  # the float32 step is gone
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8) == 1 + 2 * 2 + 1  # every convolution's weight: stem, 2 blocks of 2 layers, 1 transition
    X = deploy_check.seeded_images(PARITY_CASE, SIZE, 5, seed=1)
    expected = reference.forward(PARITY_CASE, weights, X, dtype=np.float64)[0]
    error = deploy_check.relative_error(runner(out, manifest, 1)(X), expected)
    assert 0 < error <= INT8_BOUND


@pytest.mark.slow
def test_convert_reads_the_suites_own_onnx_exports_back_bit_for_bit(onnx_exports: dict[str, Path]) -> None:
    """PyTorch's and MXNet's exports keep each BatchNorm and read back to the very tensors they were
    made from; tf2onnx writes Keras's (and, through jax2tf, Flax's) BatchNorms as Mul/Add, whose
    running statistics are gone, and the reader says so."""
    from common.deploy.onnx_import import read_onnx
    from common.errors import WeightFileError

    weights = init_canonical(PARITY_CASE, 3)
    for name, directory in onnx_exports.items():
        path = directory / read_manifest(directory)["artefact"]
        if name in ("tf", "jax"):
            with pytest.raises(WeightFileError, match="BatchNorm"):
                read_onnx(path)
            continue
        config, found, metadata = read_onnx(path)
        assert config == PARITY_CASE, name
        assert list(found) == list(weights) and all(np.array_equal(found[k], weights[k]) for k in weights), name
        assert metadata["running_var"] == "unbiased", name  # from the file's own densenet.running_var
