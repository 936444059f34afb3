"""Weight files without pickle: a numpy-only safetensors reader/writer and a plain ``.npz`` one.

safetensors layout: an 8-byte little-endian unsigned header length ``N``, ``N`` bytes of UTF-8
JSON (``name -> {"dtype", "shape", "data_offsets"}`` plus an optional ``"__metadata__"`` map of
strings), then the raw little-endian tensor bytes, contiguous and in header order. Offsets are
relative to the start of that buffer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import struct
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from common.errors import WeightFileError

__all__ = [
    "MAX_HEADER_BYTES",
    "PathLike",
    "load_file",
    "load_npz",
    "read_weights",
    "save_file",
    "save_npz",
    "write_weights",
]

PathLike = str | os.PathLike

# The reference implementation's limit; anything larger is corruption, not a real header.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
PICKLE_MESSAGE = (
    "this looks like a pickle/torch.save file; densenet-suite reads only safetensors or .npz without pickle"
)
SUFFIXES = (".safetensors", ".npz")

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Keyed by (kind, itemsize) so that byte order does not matter when writing.
_CODES = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _supported_dtype(name: str, array: np.ndarray, path: Path) -> tuple[str, np.dtype]:
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise WeightFileError(
            f"{path}: tensor {name!r} has dtype {array.dtype}, which cannot be stored; "
            f"supported: {', '.join(str(np.dtype(d)) for d in _DTYPES.values())}"
        )
    return code, _DTYPES[code]


def _prepare(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None, path: Path) -> dict[str, np.ndarray]:
    """Validate names, arrays and metadata before anything touches the disk."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise WeightFileError(f"{path}: tensor names must be strings, got {name!r}")
        if name == METADATA_KEY:
            raise WeightFileError(f"{path}: {METADATA_KEY!r} is reserved and cannot name a tensor")
        array = np.asarray(value)
        _supported_dtype(name, array, path)
        arrays[name] = array
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise WeightFileError(f"{path}: metadata must map strings to strings, got {key!r}: {value!r}")
    return arrays


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary sibling file so a crash never leaves a half-written ``path``."""
    directory = path.parent
    while True:
        tmp = directory / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            # os.open rather than mkstemp: mkstemp forces mode 0600 instead of honouring the umask.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise WeightFileError(f"cannot write {path}: {e.strerror or e}") from e
        break
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WeightFileError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    # Make the rename itself durable; not possible on every platform, hence best effort.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _check_metadata(meta: Any, path: Path) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise WeightFileError(f"{path}: {METADATA_KEY} must be a JSON object, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise WeightFileError(f"{path}: {METADATA_KEY} values must be strings, but {key!r} is {json.dumps(value)}")
    return dict(meta)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _zip_kind(path: Path) -> str:
    """Tell a torch.save archive (pickle inside) from a plain .npz, for the error message."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"
    if any(n.endswith(".pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "unknown"


# ---------------------------------------------------------------------------------------------
# safetensors


def save_file(tensors: Mapping[str, np.ndarray], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (in insertion order) and optional string ``metadata`` as safetensors."""
    path = Path(path)
    arrays = _prepare(tensors, metadata, path)
    header: dict[str, Any] = {}
    if metadata is not None:
        header[METADATA_KEY] = dict(metadata)
    layout: list[tuple[np.ndarray, np.dtype]] = []
    offset = 0
    for name, array in arrays.items():
        code, dtype = _supported_dtype(name, array, path)
        nbytes = array.size * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        layout.append((array, dtype))
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad so the buffer starts 8-byte aligned (8-byte prefix + multiple-of-8 header).
    encoded += b" " * (-len(encoded) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array, dtype in layout:
            f.write(array.astype(dtype, copy=False).tobytes(order="C"))

    _atomic_write(path, write)


def _parse_entry(name: str, entry: Any, path: Path) -> tuple[np.dtype, tuple[int, ...], int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightFileError(f"{where}: header entry must be a JSON object, got {json.dumps(entry)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise WeightFileError(f"{where}: header entry is missing {key!r}")
    code = entry["dtype"]
    if not isinstance(code, str):
        raise WeightFileError(f"{where}: dtype must be a string, got {json.dumps(code)}")
    if code not in _DTYPES:
        raise WeightFileError(f"{where}: unsupported dtype {code!r}; supported: {', '.join(_DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise WeightFileError(f"{where}: shape must be a list of non-negative ints, got {json.dumps(shape)}")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise WeightFileError(
            f"{where}: data_offsets must be [begin, end] non-negative ints, got {json.dumps(offsets)}"
        )
    begin, end = offsets
    if end < begin:
        raise WeightFileError(f"{where}: data_offsets end {end} is before begin {begin}")
    dtype = _DTYPES[code]
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise WeightFileError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but shape {tuple(shape)} "
            f"of {code} needs {needed}"
        )
    return dtype, tuple(shape), begin, end


def load_file(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: ``(tensors in file order, metadata)``. Never unpickles anything."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightFileError(f"{path}: file not found") from None
    except OSError as e:
        raise WeightFileError(f"{path}: cannot read: {e.strerror or e}") from e

    size = len(data)
    looks_pickled = data[:1] == b"\x80" or data[:2] == b"PK"
    header_len = struct.unpack("<Q", data[:8])[0] if size >= 8 else None
    # A real safetensors header can begin with 0x80 (its length's low byte), so only call it a
    # pickle when the bytes do not also make sense as safetensors.
    plausible = header_len is not None and header_len <= min(size - 8, MAX_HEADER_BYTES) and data[8:9] == b"{"
    if looks_pickled and not plausible:
        if data[:2] == b"PK" and _zip_kind(path) == "npz":
            raise WeightFileError(f"{path}: this is a .npz archive, not safetensors; give it the .npz suffix")
        raise WeightFileError(f"{path}: {PICKLE_MESSAGE}")
    if header_len is None:
        raise WeightFileError(f"{path}: file is {size} bytes, too short for the 8-byte safetensors header length")
    if header_len > MAX_HEADER_BYTES:
        raise WeightFileError(
            f"{path}: header length {header_len} is absurd (limit {MAX_HEADER_BYTES}); not a safetensors file?"
        )
    if header_len > size - 8:
        raise WeightFileError(
            f"{path}: header length {header_len} is larger than the {size - 8} bytes after it "
            "(truncated or not a safetensors file)"
        )

    try:
        text = data[8 : 8 + header_len].decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightFileError(f"{path}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise WeightFileError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    metadata = _check_metadata(header.pop(METADATA_KEY), path) if METADATA_KEY in header else {}
    buffer = memoryview(data)[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    entries = [(name, *_parse_entry(name, entry, path)) for name, entry in header.items()]
    for (prev, _, _, prev_begin, _), (name, _, _, begin, _) in itertools.pairwise(entries):
        if begin < prev_begin:
            raise WeightFileError(
                f"{path}: data_offsets are out of order: tensor {name!r} (begins at {begin}) comes after "
                f"{prev!r} (begins at {prev_begin}) in the header; tensors must be stored in header order"
            )
    expected_begin = 0
    for i, (name, dtype, shape, begin, end) in enumerate(entries):
        if begin != expected_begin:
            after = "the buffer start" if i == 0 else f"tensor {entries[i - 1][0]!r}"
            problem = (
                f"leaving a gap of {begin - expected_begin} bytes after {after}"
                if begin > expected_begin
                else f"overlapping {after}, which ends at {expected_begin}"
            )
            raise WeightFileError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}], {problem}")
        if end <= len(buffer):
            # Copy: independent, aligned, writable arrays in native byte order.
            raw = np.frombuffer(buffer[begin:end], dtype=dtype)
            tensors[name] = raw.astype(dtype.newbyteorder("=")).reshape(shape)
        expected_begin = end
    if len(buffer) < expected_begin:
        raise WeightFileError(
            f"{path}: truncated: the header describes {expected_begin} bytes of tensor data, "
            f"but only {len(buffer)} follow it"
        )
    if len(buffer) > expected_begin:
        raise WeightFileError(
            f"{path}: {len(buffer) - expected_begin} trailing bytes after the last tensor "
            f"(the header describes {expected_begin} bytes of data)"
        )
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# .npz


def save_npz(tensors: Mapping[str, np.ndarray], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a plain, uncompressed ``.npz`` (no pickle); metadata goes in a ``__metadata__`` entry."""
    path = Path(path)
    arrays = _prepare(tensors, metadata, path)
    entries = list(arrays.items())
    if metadata is not None:
        entries.append((METADATA_KEY, np.array(json.dumps(dict(metadata), ensure_ascii=False))))

    def write(f: IO[bytes]) -> None:
        # Written entry by entry (not np.savez) so any tensor name works and pickle is impossible.
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in entries:
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    _atomic_write(path, write)


def load_npz(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a ``.npz`` with ``allow_pickle=False``: ``(tensors in file order, metadata)``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except FileNotFoundError:
        raise WeightFileError(f"{path}: file not found") from None
    except OSError as e:
        raise WeightFileError(f"{path}: cannot read: {e.strerror or e}") from e
    if head[:1] == b"\x80" or (head == b"PK" and _zip_kind(path) == "torch"):
        raise WeightFileError(f"{path}: {PICKLE_MESSAGE}")

    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise WeightFileError(f"{path}: {PICKLE_MESSAGE}") from None
        raise WeightFileError(f"{path}: not a valid .npz file: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise WeightFileError(f"{path}: not a valid .npz file: {e}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise WeightFileError(f"{path}: this is a single .npy array, not a .npz archive of named tensors")
    with loaded:
        for name in loaded.files:
            try:
                array = loaded[name]
            except ValueError as e:
                if "allow_pickle" in str(e) or "Object arrays" in str(e):
                    raise WeightFileError(
                        f"{path}: entry {name!r} is an object array that would need pickle; "
                        "densenet-suite reads only numeric arrays"
                    ) from None
                raise WeightFileError(f"{path}: entry {name!r} is not a valid array: {e}") from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise WeightFileError(f"{path}: entry {name!r} cannot be read: {e}") from None
            if not isinstance(array, np.ndarray):
                raise WeightFileError(f"{path}: entry {name!r} is not a .npy array; not a plain .npz file")
            if name == METADATA_KEY:
                if array.ndim != 0 or array.dtype.kind != "U":
                    raise WeightFileError(
                        f"{path}: {METADATA_KEY} must be a 0-d unicode string of JSON, "
                        f"got dtype {array.dtype} shape {array.shape}"
                    )
                try:
                    meta = json.loads(str(array[()]))
                except ValueError as e:
                    raise WeightFileError(f"{path}: {METADATA_KEY} is not valid JSON: {e}") from None
                metadata = _check_metadata(meta, path)
                continue
            _supported_dtype(name, array, path)
            if not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
            tensors[name] = array
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# Dispatch on the suffix


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightFileError(
            f"{path}: unsupported weight file suffix {path.suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}"
        )
    return suffix


def read_weights(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a ``.safetensors`` or ``.npz`` weight file: ``(tensors, metadata)``."""
    path = Path(path)
    return load_file(path) if _suffix(path) == ".safetensors" else load_npz(path)


def write_weights(tensors: Mapping[str, np.ndarray], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a ``.safetensors`` or ``.npz`` weight file, chosen by the suffix of ``path``."""
    path = Path(path)
    if _suffix(path) == ".safetensors":
        save_file(tensors, path, metadata)
    else:
        save_npz(tensors, path, metadata)
