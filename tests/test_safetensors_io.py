"""The numpy-only safetensors / .npz reader and writer."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common import safetensors_io as sio
from common.errors import WeightFileError

HAVE_SAFETENSORS = importlib.util.find_spec("safetensors") is not None


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # Deliberately not in sorted order, to check that file order is kept.
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


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A file assembled byte by byte, bypassing ``save_file``'s checks."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(encoded) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + encoded + data)
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
        assert got.flags.writeable and got.flags.c_contiguous, name
    loaded["z.conv.weight"][0, 0, 0, 0] = 42.0  # writable and not shared with anything


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_without_metadata_and_big_endian_input(tmp_path: Path, suffix: str) -> None:
    big = np.arange(5, dtype=">f4")
    path = tmp_path / f"w{suffix}"
    sio.write_weights({"x": big, "t": np.asfortranarray(np.ones((2, 3)))}, path)
    loaded, meta = sio.read_weights(path)
    assert meta == {}
    assert loaded["x"].dtype == np.float32 and loaded["x"].dtype.isnative
    np.testing.assert_array_equal(loaded["x"], big)
    np.testing.assert_array_equal(loaded["t"], np.ones((2, 3)))


def test_header_is_padded_to_eight_bytes(tmp_path: Path) -> None:
    for n in range(1, 9):
        path = tmp_path / f"p{n}.safetensors"
        sio.save_file({"x" * n: np.zeros(n, np.float32)}, path)
        raw = path.read_bytes()
        header_len = struct.unpack("<Q", raw[:8])[0]
        assert header_len % 8 == 0
        assert raw[8 : 8 + header_len].rstrip(b" ").endswith(b"}")


def test_hand_made_file_parses(tmp_path: Path) -> None:
    header = (
        b'{"__metadata__":{"format":"pt"},'
        b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"n":{"dtype":"I64","shape":[],"data_offsets":[8,16]}}'
    )
    header += b" " * 5  # the spec allows trailing spaces
    data = struct.pack("<2f", 1.5, -2.0) + struct.pack("<q", -7)
    path = write_raw(tmp_path / "hand.safetensors", header, data)
    tensors, meta = sio.load_file(path)
    assert meta == {"format": "pt"}
    assert list(tensors) == ["w", "n"]
    np.testing.assert_array_equal(tensors["w"], np.array([1.5, -2.0], np.float32))
    assert tensors["n"].shape == () and tensors["n"].dtype == np.int64 and tensors["n"] == -7


def test_header_length_with_low_byte_0x80_is_not_mistaken_for_pickle(tmp_path: Path) -> None:
    header = json.dumps({"x": entry("F32", [1], 0, 4)}).encode()
    header += b" " * (0x80 - len(header))
    path = write_raw(tmp_path / "x.safetensors", header, struct.pack("<f", 3.0))
    assert path.read_bytes()[:1] == b"\x80"
    tensors, _ = sio.load_file(path)
    assert tensors["x"][0] == 3.0


F4 = struct.pack("<f", 1.0)

CORRUPT = {
    "not valid JSON": (b"{not json}", b""),
    "UTF-8": (b'{"\xff\xfe":1}', b""),
    "must be a JSON object, got list": (b"[1, 2]", b""),
    "header entry must be a JSON object": ({"x": [1, 2]}, b""),
    "missing 'dtype'": ({"x": {"shape": [1], "data_offsets": [0, 4]}}, F4),
    "missing 'shape'": ({"x": {"dtype": "F32", "data_offsets": [0, 4]}}, F4),
    "missing 'data_offsets'": ({"x": {"dtype": "F32", "shape": [1]}}, F4),
    "dtype must be a string": ({"x": entry(3, [1], 0, 4)}, F4),  # type: ignore[arg-type]
    "unsupported dtype 'BF16'": ({"x": entry("BF16", [2], 0, 4)}, F4),
    "shape must be a list": ({"x": entry("F32", [-1], 0, 4)}, F4),
    "shape must be a list of non-negative": ({"x": entry("F32", [1.0], 0, 4)}, F4),
    "data_offsets must be": ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, F4),
    "data_offsets must be [begin": ({"x": entry("F32", [1], -4, 0)}, F4),
    "is before begin": ({"x": entry("F32", [0], 4, 0)}, F4),
    "needs 8": ({"x": entry("F32", [2], 0, 4)}, F4),
    "out of order": ({"x": entry("F32", [1], 4, 8), "y": entry("F32", [1], 0, 4)}, F4 * 2),
    "overlapping tensor 'x'": ({"x": entry("F32", [2], 0, 8), "y": entry("F32", [1], 4, 8)}, F4 * 2),
    "gap of 4 bytes after tensor 'x'": ({"x": entry("F32", [1], 0, 4), "y": entry("F32", [1], 8, 12)}, F4 * 3),
    "gap of 4 bytes after the buffer start": ({"x": entry("F32", [1], 4, 8)}, F4 * 2),
    "trailing bytes": ({"x": entry("F32", [1], 0, 4)}, F4 + b"junk"),
    "truncated": ({"x": entry("F32", [2], 0, 8)}, F4),
    "values must be strings": ({"__metadata__": {"a": 1}, "x": entry("F32", [1], 0, 4)}, F4),
    "__metadata__ must be a JSON object": ({"__metadata__": ["a"]}, b""),
    "duplicate key 'x'": (b'{"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"x":1}', F4),
}


@pytest.mark.parametrize("expected", list(CORRUPT))
def test_corrupt_header_is_refused(tmp_path: Path, expected: str) -> None:
    header, data = CORRUPT[expected]
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(WeightFileError) as info:
        sio.load_file(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (struct.pack("<Q", 64) + b"{}", "larger than the 2 bytes after it"),
        (struct.pack("<Q", 2**40) + b"{}", "absurd"),
        (struct.pack("<Q", sio.MAX_HEADER_BYTES + 1) + b"{}", "absurd"),
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
        with pytest.raises(WeightFileError):
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


@pytest.mark.skipif(not HAVE_SAFETENSORS, reason="the safetensors package is not installed")
def test_interoperates_with_the_safetensors_package(tmp_path: Path) -> None:
    from safetensors.numpy import load_file as st_load
    from safetensors.numpy import save_file as st_save

    tensors = {k: v for k, v in sample().items() if v.size}  # older releases reject empty tensors
    ours = tmp_path / "ours.safetensors"
    sio.save_file(tensors, ours, {"k": "v"})
    theirs_view = st_load(str(ours))
    for name, array in tensors.items():
        assert theirs_view[name].tobytes() == array.tobytes()

    theirs = tmp_path / "theirs.safetensors"
    st_save(tensors, str(theirs), metadata={"k": "v"})
    loaded, meta = sio.load_file(theirs)
    assert meta == {"k": "v"}
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].tobytes() == array.tobytes()
