"""Canonical weight files (common.weights.canonical) and the ``densenet init`` / ``densenet convert`` commands."""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from common.arch import canonical_spec
from common.cli.weights import add_parsers
from common.config import DenseNetConfig
from common.errors import BackendError, WeightFileError
from common.registry import available
from common.weights.canonical import FORMAT, init_canonical, load_canonical, load_weights, save_weights
from common.weights.safetensors_io import read_weights, write_weights

TINY = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
TINY_ARGS = ["--num-channels", "8", "--growth-rate", "4", "--arch", "2,2"]
SUFFIXES = [".safetensors", ".npz"]


def run(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="densenet")
    sub = p.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = p.parse_args(list(argv))
    return args.func(args)


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k


@pytest.fixture(params=SUFFIXES)
def suffix(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_file(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"tiny{suffix}"
    save_weights(path, init_canonical(TINY, 0), TINY, source="numpy-init")
    return path


# ---------------------------------------------------------------------------------------------
# save_weights / load_weights


def test_init_canonical_is_the_reference_init() -> None:
    assert_bit_identical(init_canonical(TINY, 5), init_canonical(TINY, 5))


def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    config = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2), num_classes=3, in_channels=2, drop_rate=0.1)
    weights = init_canonical(config, 1)
    path = tmp_path / f"w{suffix}"
    save_weights(path, weights, config, source="torch")
    loaded_config, loaded = load_weights(path)
    assert loaded_config == config
    assert_bit_identical(loaded, weights)
    assert list(loaded) == list(canonical_spec(config))
    _, metadata = read_weights(path)
    assert metadata["format"] == FORMAT and metadata["format_version"] == "1"
    assert metadata["source"] == "torch"
    assert DenseNetConfig.from_dict(json.loads(metadata["config"])) == config
    assert load_weights(path, expected_config=config)[0] == config


def test_save_casts_to_float32_in_canonical_order(tmp_path: Path) -> None:
    weights = {k: v.astype(np.float64) for k, v in reversed(init_canonical(TINY, 0).items())}
    path = tmp_path / "w.safetensors"
    save_weights(path, weights, TINY)
    tensors, metadata = read_weights(path)
    assert list(tensors) == list(canonical_spec(TINY))
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert metadata["source"] == "unknown"


def test_save_refuses_bad_weights_and_writes_nothing(tmp_path: Path) -> None:
    weights = init_canonical(TINY, 0)
    del weights["head.fc.bias"]
    weights["stem.conv.weight"] = weights["stem.conv.weight"][:4]
    weights["extra"] = np.zeros(3, np.float32)
    path = tmp_path / "w.npz"
    with pytest.raises(WeightFileError) as info:
        save_weights(path, weights, TINY)
    message = str(info.value)
    assert "head.fc.bias" in message and "extra" in message and "stem.conv.weight" in message
    assert not path.exists()
    big = {k: v.astype(np.float64) for k, v in init_canonical(TINY, 0).items()}
    big["head.fc.bias"][0] = 1e300  # finite in float64, infinite in float32
    with pytest.raises(WeightFileError, match="head.fc.bias"):
        save_weights(path, big, TINY)
    assert list(tmp_path.iterdir()) == []


def test_expected_config_mismatch_lists_the_fields(tiny_file: Path) -> None:
    expected = TINY.replace(growth_rate=8, arch=(2, 3))
    with pytest.raises(WeightFileError) as info:
        load_weights(tiny_file, expected_config=expected)
    message = str(info.value)
    assert str(tiny_file) in message
    assert "growth_rate: file has 4, expected 8" in message
    assert "arch: file has 2,2, expected 2,3" in message
    assert "num_channels" not in message
    # drop_rate does not shape the weights, so it is not compared
    assert load_weights(tiny_file, expected_config=TINY.replace(drop_rate=0.5))[0] == TINY


# Hand-edited and foreign files: each maker breaks (or replaces) a good canonical file in place and
# returns fragments the error message must contain.


def _edit(path: Path, change: Callable[[dict[str, np.ndarray], dict[str, str]], None]) -> None:
    tensors, metadata = read_weights(path)
    change(tensors, metadata)
    write_weights(tensors, path, metadata)


def _tensor_problems(path: Path) -> list[str]:
    def change(t: dict[str, np.ndarray], m: dict[str, str]) -> None:
        del t["dense1.conv2.conv.bias"]
        t["dense9.conv1.conv.weight"] = np.zeros((1, 1, 3, 3), np.float32)
        t["transition1.conv.weight"] = t["transition1.conv.weight"][:, :, :1, :1].repeat(2, axis=2)
        t["head.fc.weight"] = t["head.fc.weight"].copy()
        t["head.fc.weight"][1, 2] = np.nan
        t["stem.bn.bias"] = t["stem.bn.bias"].astype(np.float64)

    _edit(path, change)
    return [
        "missing 1 tensor(s): dense1.conv2.conv.bias",
        "unexpected 1 tensor(s): dense9.conv1.conv.weight",
        "transition1.conv.weight: expected shape (8, 16, 1, 1), got (8, 16, 2, 1)",
        "head.fc.weight: contains NaN",
        "stem.bn.bias: expected float32, got float64",
    ]


def _no_metadata(path: Path) -> list[str]:
    tensors, _ = read_weights(path)
    write_weights(tensors, path)
    return ["not a densenet-suite canonical weight file", "no 'format' metadata"]


def _torch_state_dict(path: Path) -> list[str]:
    tensors = {
        "net.0.0.weight": np.zeros((8, 1, 7, 7), np.float32),
        "net.0.1.running_mean": np.zeros(8, np.float32),
        "net.0.1.num_batches_tracked": np.zeros((), np.int64),
    }
    write_weights(tensors, path)
    return ["not a densenet-suite canonical weight file", "PyTorch state dict", "--from-format torchvision"]


def _other_format(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(format="something-else"))
    return ["format 'something-else'"]


def _newer_version(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(format_version="2"))
    return ["format version '2' is not supported"]


def _bad_config_json(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(config="{'num_channels': 8"))
    return ["'config' is not valid JSON"]


def _config_not_object(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(config="[8, 4]"))
    return ["'config' must be a JSON object"]


def _config_unknown_key(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(config=json.dumps({**TINY.to_dict(), "dropout": 0.5})))
    return ["not a valid configuration", "dropout"]


def _config_with_lr(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(config=json.dumps({**TINY.to_dict(), "lr": 0.1})))
    return ["not a valid configuration", "unknown configuration keys ['lr']"]


def _no_running_var(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.pop("running_var"))
    return ["metadata has no running_var entry, expected one of unbiased, biased"]


def _config_invalid_value(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(config=json.dumps({**TINY.to_dict(), "growth_rate": -4})))
    return ["not a valid configuration", "growth_rate must be a positive int"]


def _config_missing_field(path: Path) -> list[str]:
    _edit(path, lambda t, m: m.update(config=json.dumps({"num_channels": 8, "growth_rate": 4})))
    return ["'config' lacks arch, num_classes, in_channels"]


def _truncated(path: Path) -> list[str]:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return []  # the reader's own message (truncated safetensors / bad zip) is enough


def _pickle(path: Path) -> list[str]:
    with open(path, "wb") as f:
        pickle.dump(init_canonical(TINY, 0), f)
    return ["pickle"]


BROKEN = {
    f.__name__.strip("_"): f
    for f in (
        _tensor_problems,
        _no_metadata,
        _torch_state_dict,
        _other_format,
        _newer_version,
        _bad_config_json,
        _config_not_object,
        _config_unknown_key,
        _config_with_lr,
        _no_running_var,
        _config_invalid_value,
        _config_missing_field,
        _truncated,
        _pickle,
    )
}


@pytest.mark.parametrize("breaker", BROKEN.values(), ids=BROKEN.keys())
def test_load_refuses_broken_files(tiny_file: Path, breaker: Callable[[Path], list[str]]) -> None:
    fragments = breaker(tiny_file)
    with pytest.raises(WeightFileError) as info:
        load_weights(tiny_file)
    message = str(info.value)
    assert str(tiny_file) in message
    for fragment in fragments:
        assert fragment in message


def test_tensor_problems_are_reported_in_one_error(tiny_file: Path) -> None:
    fragments = _tensor_problems(tiny_file)
    with pytest.raises(WeightFileError) as info:
        load_weights(tiny_file)
    first, *problems = str(info.value).splitlines()
    assert first == f"{tiny_file}: tensors do not fit the network:"
    assert len(problems) == len(fragments)
    for fragment in fragments:
        assert sum(fragment in line for line in problems) == 1, fragment


@pytest.mark.parametrize("breaker", BROKEN.values(), ids=BROKEN.keys())
@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_failed_convert_changes_nothing(
    tmp_path: Path, tiny_file: Path, breaker: Callable[[Path], list[str]], existing: bool
) -> None:
    breaker(tiny_file)
    broken = tiny_file.read_bytes()
    out = tmp_path / "out.safetensors"
    if existing:
        out.write_bytes(b"previous content")
    with pytest.raises(WeightFileError):
        run("convert", "--from", str(tiny_file), "--to", str(out))
    assert tiny_file.read_bytes() == broken
    assert (out.read_bytes() == b"previous content") if existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tiny_file.name] + ([out.name] if existing else []))


# ---------------------------------------------------------------------------------------------
# densenet init / densenet convert


def test_init_writes_a_seeded_canonical_file(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture) -> None:
    a, b, c = (tmp_path / f"{n}{suffix}" for n in "abc")
    assert run("init", "--out", str(a), "--seed", "7", *TINY_ARGS, "--num-classes", "3") == 0
    assert "wrote" in capsys.readouterr().out
    config, weights = load_weights(a)
    assert config == TINY.replace(num_classes=3)
    assert_bit_identical(weights, init_canonical(config, 7))
    assert read_weights(a)[1]["source"] == "numpy-init"
    run("init", "--out", str(b), "--seed", "7", *TINY_ARGS, "--num-classes", "3")
    run("init", "--out", str(c), "--seed", "8", *TINY_ARGS, "--num-classes", "3")
    assert_bit_identical(load_weights(b)[1], weights)
    assert not np.array_equal(load_weights(c)[1]["stem.conv.weight"], weights["stem.conv.weight"])


def test_convert_without_backends_changes_only_the_format(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = ".npz" if tiny_file.suffix == ".safetensors" else ".safetensors"
    out = tmp_path / f"out{other}"
    assert run("convert", "--from", str(tiny_file), "--to", str(out)) == 0
    assert_bit_identical(load_weights(out)[1], load_weights(tiny_file)[1])
    assert read_weights(out)[1]["source"] == "numpy-init"
    text = capsys.readouterr().out
    assert "42 tensors" in text and "2,322 parameters" in text


def test_convert_refuses_to_overwrite_its_input(tiny_file: Path) -> None:
    before = tiny_file.read_bytes()
    for dst in (tiny_file, tiny_file.parent / "." / tiny_file.name):
        with pytest.raises(WeightFileError, match="is the input file"):
            run("convert", "--from", str(tiny_file), "--to", str(dst))
    assert tiny_file.read_bytes() == before


def test_convert_refuses_bad_output_suffix_and_unknown_backend(tiny_file: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightFileError, match="suffix"):
        run("convert", "--from", str(tiny_file), "--to", str(tmp_path / "out.pt"))
    with pytest.raises(BackendError, match="unknown backend"):
        run("convert", "--from", str(tiny_file), "--to", str(tmp_path / "out.npz"), "--backend", "caffe")
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "out.pt").exists()


class _PerturbingAdapter:
    """Stands in for a backend whose export changes one value by one ulp."""

    name = "torch"

    def version(self) -> str:
        return "fake"

    def build(self, config: DenseNetConfig, seed: int = 0) -> dict:
        return {}

    def set_weights(self, model: dict, weights: dict[str, np.ndarray]) -> None:
        model.update({k: v.copy() for k, v in weights.items()})

    def get_weights(self, model: dict) -> dict[str, np.ndarray]:
        model["dense2.conv1.bn.running_var"][0] = np.nextafter(
            model["dense2.conv1.bn.running_var"][0], np.float32(np.inf)
        )
        return model


def test_convert_fails_when_a_round_trip_changes_a_tensor(
    tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("common.cli.weights.load_backend", lambda name: _PerturbingAdapter())
    out = tmp_path / "out.npz"
    out.write_bytes(b"previous content")
    assert run("convert", "--from", str(tiny_file), "--to", str(out), "--backend", "torch") == 1
    err = capsys.readouterr().err
    assert "changed 1 of 42 tensor(s)" in err and "dense2.conv1.bn.running_var (1 of" in err
    assert out.read_bytes() == b"previous content"


def test_convert_round_trip_through_backend(
    backend_name: str, adapter, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    assert run("init", "--out", str(src), "--seed", "3", *TINY_ARGS) == 0
    assert run("convert", "--from", str(src), "--to", str(out), "--backend", backend_name) == 0
    assert f"{backend_name} {adapter.version()}: round trip bit-identical (42 tensors)" in capsys.readouterr().out
    found = load_canonical(out, expected_config=TINY)
    assert found.metadata["source"] == backend_name
    assert_bit_identical(found.weights, load_weights(src)[1])


def test_convert_chains_every_available_backend(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = [s.name for s in available() if s.available]
    if not names:
        pytest.skip("no backend is installed")
    src, out = tmp_path / "in.safetensors", tmp_path / "out.npz"
    assert run("init", "--out", str(src), "--seed", "4", *TINY_ARGS) == 0
    # the first two comma-separated, the rest repeated: both spellings chain in the given order
    backend_args = ["--backend", ",".join(names[:2]), *[a for n in names[2:] for a in ("--backend", n)]]
    assert run("convert", "--from", str(src), "--to", str(out), *backend_args) == 0
    text = capsys.readouterr().out
    assert [line.split()[0] for line in text.splitlines() if "round trip bit-identical" in line] == names
    found = load_canonical(out)
    assert found.config == TINY and found.metadata["source"] == names[-1]
    assert_bit_identical(found.weights, load_weights(src)[1])
