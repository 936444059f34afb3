"""Our layer over the safetensors package and the .npz reader/writer: order, metadata, atomic
writes and one clear WeightFileError for every bad file."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from common.errors import WeightFileError
from common.weights import safetensors_io as sio


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # Deliberately in neither name nor dtype order, to check that the written order is kept.
    return {
        "z.conv.weight": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
        "a.scalar": np.array(np.pi),
        "m.index": np.array([-(2**62), -1, 0, 7, 2**62], dtype=np.int64),
        "b.half": np.array([1.5, -0.0, np.inf], dtype=np.float16),
        "c.int32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "d.bytes": np.array([0, 255], dtype=np.uint8),
        "e.mask": np.array([True, False]),
        "f.empty": np.zeros((0, 4), dtype=np.float32),
        "g.f64": rng.standard_normal((2, 1, 2, 5)),
    }


def write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    """A file assembled byte by byte, bypassing every writer's checks."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_is_bit_identical(tmp_path: Path, suffix: str) -> None:
    tensors = sample()
    metadata = {"format": "np", "config": json.dumps({"arch": [4, 4]}), "unicode": "größe"}
    path = tmp_path / f"w{suffix}"
    sio.write_weights(tensors, path, metadata)
    loaded, meta = sio.read_weights(path)
    assert list(loaded) == list(tensors)
    assert meta == metadata
    for name, array in tensors.items():
        got = loaded[name]
        assert got.dtype == array.dtype and got.shape == array.shape, name
        assert got.tobytes() == array.tobytes(), name
        assert got.flags.writeable and got.flags.c_contiguous and got.flags.aligned, name
    loaded["z.conv.weight"][0, 0, 0, 0] = 42.0  # writable and not shared with anything


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_without_metadata_big_endian_and_fortran_input(tmp_path: Path, suffix: str) -> None:
    big = np.arange(5, dtype=">f4")
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    strided = np.arange(10, dtype=np.int64)[::2]
    path = tmp_path / f"w{suffix}"
    sio.write_weights({"x": big, "t": fortran, "s": strided}, path)
    loaded, meta = sio.read_weights(path)
    assert meta == {}
    assert loaded["x"].dtype == np.float32 and loaded["x"].dtype.isnative
    np.testing.assert_array_equal(loaded["x"], big)
    np.testing.assert_array_equal(loaded["t"], fortran)  # not stored scrambled
    np.testing.assert_array_equal(loaded["s"], strided)


def test_file_from_the_safetensors_package(tmp_path: Path) -> None:
    tensors = sample()
    theirs = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(tensors, str(theirs), metadata={"k": "v"})
    loaded, meta = sio.load_file(theirs)
    assert meta == {"k": "v"}
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].tobytes() == array.tobytes(), name

    bare = tmp_path / "bare.safetensors"
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, str(bare))
    assert sio.load_file(bare)[1] == {}


def test_the_safetensors_package_reads_our_files(tmp_path: Path) -> None:
    tensors = sample()
    ours = tmp_path / "ours.safetensors"
    sio.save_file(tensors, ours, {"k": "v"})
    theirs = safetensors.numpy.load_file(str(ours))
    assert set(theirs) == set(tensors)
    for name, array in tensors.items():
        assert theirs[name].dtype == array.dtype and theirs[name].tobytes() == array.tobytes(), name
    with safetensors.safe_open(str(ours), framework="numpy") as f:
        assert f.metadata()["k"] == "v"


def test_order_entry(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    sio.save_file({"b": np.ones(1), "a": np.ones(1)}, path)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert json.loads(f.metadata()[sio.ORDER_KEY]) == ["b", "a"]

    # Another tool added a tensor and kept the metadata: listed ones first, then the rest.
    added = tmp_path / "added.safetensors"
    metadata = {sio.ORDER_KEY: json.dumps(["z", "gone", "b"]), "k": "v"}
    safetensors.numpy.save_file({n: np.ones(1) for n in "abz"}, str(added), metadata=metadata)
    tensors, meta = sio.load_file(added)
    assert list(tensors) == ["z", "b", "a"] and meta == {"k": "v"}

    broken = tmp_path / "broken.safetensors"
    safetensors.numpy.save_file({"a": np.ones(1)}, str(broken), metadata={sio.ORDER_KEY: "{oops"})
    with pytest.raises(WeightFileError, match="must be a JSON list of tensor names"):
        sio.load_file(broken)


def test_header_length_with_low_byte_0x80_is_not_mistaken_for_pickle(tmp_path: Path) -> None:
    header = json.dumps({"x": entry("F32", [1], 0, 4)}).encode()
    header += b" " * (0x80 - len(header))
    path = write_raw(tmp_path / "x.safetensors", header, struct.pack("<f", 3.0))
    assert path.read_bytes()[:1] == b"\x80"
    tensors, _ = sio.load_file(path)
    assert tensors["x"][0] == 3.0
    # Broken in some other way, it is still not called a pickle.
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(WeightFileError, match="truncated"):
        sio.load_file(path)


F4 = struct.pack("<f", 1.0)

# Expected words in our message -> (header, tensor data). Each must give one WeightFileError.
CORRUPT = {
    "corrupted safetensors header: invalid JSON": (b"{not json}", b""),
    "corrupted safetensors header: invalid UTF-8": (b'{"\xff\xfe":1}', b""),
    "corrupted safetensors header": (b"[1, 2]", b""),
    "missing field `dtype`": ({"x": {"shape": [1], "data_offsets": [0, 4]}}, F4),
    "missing field `data_offsets`": ({"x": {"dtype": "F32", "shape": [1]}}, F4),
    "unknown variant `Q17`": ({"x": entry("Q17", [1], 0, 4)}, F4),
    "unsupported dtype 'BF16'": ({"x": entry("BF16", [2], 0, 4)}, F4),
    "unsupported dtype 'F8_E4M3'": ({"x": entry("F8_E4M3", [4], 0, 4)}, F4),
    "C64": ({"x": entry("C64", [1], 0, 8)}, F4 * 2),
    "expected usize": ({"x": entry("F32", [-1], 0, 4)}, F4),
    "invalid offset for tensor `x`": ({"x": entry("F32", [0], 4, 0)}, F4),
    "invalid shape, data type, or offset": ({"x": entry("F32", [2], 0, 4)}, F4),
    "invalid offset for tensor `y`": ({"x": entry("F32", [2], 0, 8), "y": entry("F32", [1], 4, 8)}, F4 * 2),
    "4 trailing bytes after the last tensor": ({"x": entry("F32", [1], 0, 4)}, F4 + b"junk"),
    "truncated: the header describes 8 bytes of tensor data, but only 4": ({"x": entry("F32", [2], 0, 8)}, F4),
    "expected a string": ({"__metadata__": {"a": 1}, "x": entry("F32", [1], 0, 4)}, F4),
}


@pytest.mark.parametrize("expected", list(CORRUPT))
def test_corrupt_file_is_refused(tmp_path: Path, expected: str) -> None:
    header, data = CORRUPT[expected]
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(WeightFileError) as info:
        sio.load_file(path)
    message = str(info.value)
    assert expected in message
    assert message.startswith(f"{path}: ")
    assert "Error while deserializing" not in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "0 bytes, too short"),
        (b"\x01\x02\x03", "3 bytes, too short"),
        (struct.pack("<Q", 64) + b"{}", "larger than the 2 bytes after it"),
        (struct.pack("<Q", 2**40) + b"{}", "truncated or not a safetensors file"),
    ],
)
def test_bad_length_prefix(tmp_path: Path, raw: bytes, expected: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(WeightFileError, match=expected):
        sio.load_file(path)


def test_missing_file(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.safetensors", tmp_path / "nope.npz"):
        with pytest.raises(WeightFileError, match="not found") as info:
            sio.read_weights(path)
        assert "nope" in str(info.value)


def test_truncation_anywhere_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    sio.save_file(sample(), path, {"k": "v"})
    raw = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    cuts = [0, 1, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, len(raw) - 1]
    for cut in cuts:
        short = tmp_path / f"cut{cut}.safetensors"
        short.write_bytes(raw[:cut])
        with pytest.raises(WeightFileError, match="truncated|too short"):
            sio.load_file(short)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_pickle_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(WeightFileError, match="looks like a pickle/torch.save file"):
        sio.read_weights(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_torch_save_zip_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    # The layout torch.save writes: a zip archive holding a pickle.
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(WeightFileError, match="densenet-suite reads only safetensors or .npz without pickle"):
        sio.read_weights(path)


def test_npz_with_wrong_suffix_gets_a_hint(tmp_path: Path) -> None:
    npz = tmp_path / "w.npz"
    sio.save_npz({"x": np.ones(3)}, npz)
    renamed = tmp_path / "w.safetensors"
    renamed.write_bytes(npz.read_bytes())
    with pytest.raises(WeightFileError, match="is a .npz archive"):
        sio.load_file(renamed)


def test_npz_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, good=np.ones(2), bad=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(WeightFileError, match="object array that would need pickle"):
        sio.load_npz(path)


def test_npz_other_problems(tmp_path: Path) -> None:
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(WeightFileError, match="single .npy array"):
        sio.load_npz(npy)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(WeightFileError, match="not a valid .npz"):
        sio.load_npz(garbage)

    bad_meta = tmp_path / "meta.npz"
    np.savez(bad_meta, x=np.ones(1), __metadata__=np.array(json.dumps({"a": 1})))
    with pytest.raises(WeightFileError, match="values must be strings"):
        sio.load_npz(bad_meta)

    not_json = tmp_path / "meta2.npz"
    np.savez(not_json, __metadata__=np.array("{oops"))
    with pytest.raises(WeightFileError, match="not valid JSON"):
        sio.load_npz(not_json)

    strings = tmp_path / "strings.npz"
    np.savez(strings, x=np.array(["a", "b"]))
    with pytest.raises(WeightFileError, match="cannot be stored"):
        sio.load_npz(strings)


def test_unknown_suffix(tmp_path: Path) -> None:
    for name in ("w.pt", "w.pth", "w"):
        with pytest.raises(WeightFileError, match=r"\.safetensors, \.npz"):
            sio.read_weights(tmp_path / name)
        with pytest.raises(WeightFileError, match="unsupported weight file suffix"):
            sio.write_weights({"x": np.ones(1)}, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_refuses_what_it_cannot_store(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    with pytest.raises(WeightFileError, match="cannot be stored"):
        sio.write_weights({"x": np.array([None, 1], dtype=object)}, path)
    with pytest.raises(WeightFileError, match="cannot be stored"):
        sio.write_weights({"x": np.ones(2, np.complex64)}, path)
    with pytest.raises(WeightFileError, match="reserved"):
        sio.write_weights({"__metadata__": np.ones(1)}, path)
    with pytest.raises(WeightFileError, match="reserved"):
        sio.write_weights({"x": np.ones(1)}, path, {sio.ORDER_KEY: "[]"})
    with pytest.raises(WeightFileError, match="strings to strings"):
        sio.write_weights({"x": np.ones(1)}, path, {"epoch": 3})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("existing", [True, False])
def test_failed_write_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, existing: bool
) -> None:
    path = tmp_path / f"w{suffix}"
    if existing:
        sio.write_weights({"old": np.arange(4.0)}, path, {"v": "1"})
        before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    # fsync runs after all the bytes went into the temporary file: the latest possible failure.
    monkeypatch.setattr(sio.os, "fsync", broken_fsync)
    with pytest.raises(WeightFileError, match="No space left"):
        sio.write_weights(sample(), path, {"v": "2"})
    monkeypatch.undo()

    if existing:
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == [path.name]
        assert sio.read_weights(path)[1] == {"v": "1"}
    else:
        assert os.listdir(tmp_path) == []


def test_failure_while_writing_tensors_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.npz"
    sio.save_npz({"old": np.zeros(2)}, path)
    before = path.read_bytes()
    real = np.lib.format.write_array
    calls = []

    def fail_on_second(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash mid-write")
        real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", fail_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sio.save_npz(sample(), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
