"""Weight files without pickle: safetensors through the ``safetensors`` package, and plain ``.npz``.

The ``safetensors`` package (its numpy API, which imports no ML framework) parses and encodes the
format. What this module adds: atomic writes, the tensors' order, string metadata, ``.npz`` read
without pickle, and :class:`~common.errors.WeightFileError` messages that name the file and say
what is wrong, instead of the library's exceptions.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors
import safetensors.numpy

from common.errors import WeightFileError

__all__ = [
    "SUFFIXES",
    "PathLike",
    "load_file",
    "load_npz",
    "read_weights",
    "save_file",
    "save_npz",
    "write_weights",
]

PathLike = str | os.PathLike

SUFFIXES = (".safetensors", ".npz")
METADATA_KEY = "__metadata__"
# safetensors lays tensors out sorted by dtype and name. Callers rely on the order they wrote
# (the network's order; for Gluon's counter-based names it is the only key), so it travels in
# this metadata entry, which load_file strips again.
ORDER_KEY = "densenet-suite/order"
PICKLE_MESSAGE = (
    "this looks like a pickle/torch.save file; densenet-suite reads only safetensors or .npz without pickle"
)
_LIBRARY_PREFIX = "Error while deserializing header: "

# The numeric dtypes every backend and both formats share; safetensors names on the left.
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


def _supported_dtype(name: str, array: np.ndarray, path: Path) -> np.dtype:
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise WeightFileError(
            f"{path}: tensor {name!r} has dtype {array.dtype}, which cannot be stored; "
            f"supported: {', '.join(str(d) for d in _DTYPES.values())}"
        )
    return _DTYPES[code]


def _prepare(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None, path: Path) -> dict[str, np.ndarray]:
    """Validate names, arrays and metadata before anything touches the disk.

    Returns C-contiguous little-endian arrays: safetensors' numpy writer copies raw memory, so a
    Fortran-ordered or strided array would otherwise be stored scrambled.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise WeightFileError(f"{path}: tensor names must be strings, got {name!r}")
        if name == METADATA_KEY:
            raise WeightFileError(f"{path}: {METADATA_KEY!r} is reserved and cannot name a tensor")
        array = np.asarray(value)
        arrays[name] = np.asarray(array, dtype=_supported_dtype(name, array, path), order="C")
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise WeightFileError(f"{path}: metadata must map strings to strings, got {key!r}: {value!r}")
        if ORDER_KEY in metadata:
            raise WeightFileError(f"{path}: metadata key {ORDER_KEY!r} is reserved for the tensors' order")
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
    """Write ``tensors`` and optional string ``metadata`` as safetensors, atomically.

    :func:`load_file` gives the tensors back in the order of ``tensors``.
    """
    path = Path(path)
    arrays = _prepare(tensors, metadata, path)
    header = {**(metadata or {}), ORDER_KEY: json.dumps(list(arrays), ensure_ascii=False)}
    try:
        data = safetensors.numpy.save(arrays, metadata=header)
    except safetensors.SafetensorError as e:
        raise WeightFileError(f"{path}: cannot encode as safetensors: {e}") from None

    def write(f: IO[bytes]) -> None:
        f.write(data)

    _atomic_write(path, write)


def load_file(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: ``(tensors in the order they were written, metadata)``. Never unpickles."""
    path = Path(path)
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            names = f.offset_keys()
            for name in names:
                # Check first: the library fails on e.g. BF16 with numpy's own TypeError.
                code = f.get_slice(name).get_dtype()
                if code not in _DTYPES:
                    raise WeightFileError(
                        f"{path}: tensor {name!r} has unsupported dtype {code!r}; "
                        f"densenet-suite reads {', '.join(_DTYPES)}"
                    )
            # The library copies out of its mapping; require() guards alignment and writability.
            tensors = {name: np.require(f.get_tensor(name), requirements=["C", "A", "W"]) for name in names}
    except FileNotFoundError:
        raise WeightFileError(f"{path}: file not found") from None
    except safetensors.SafetensorError as e:
        raise WeightFileError(f"{path}: {_diagnose(path, e)}") from None
    except OSError as e:
        problem = "is a directory, not a weight file" if path.is_dir() else f"cannot read: {e.strerror or e}"
        raise WeightFileError(f"{path}: {problem}") from None
    return _in_written_order(tensors, metadata, path), metadata


def _in_written_order(tensors: dict[str, np.ndarray], metadata: dict[str, str], path: Path) -> dict[str, np.ndarray]:
    """Reorder by (and remove) :data:`ORDER_KEY`; files from other writers keep their file order."""
    text = metadata.pop(ORDER_KEY, None)
    if text is None:
        return tensors
    try:
        order = json.loads(text)
    except ValueError:
        order = None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise WeightFileError(f"{path}: metadata {ORDER_KEY!r} must be a JSON list of tensor names, got {text[:80]!r}")
    ordered = {name: tensors[name] for name in order if name in tensors}
    # Tensors the list lacks (another tool added them but kept our metadata) follow in file order.
    return ordered | {name: t for name, t in tensors.items() if name not in ordered}


def _diagnose(path: Path, error: Exception) -> str:
    """What is wrong with a file the library refused, in words: the library's own are terse."""
    detail = str(error).removeprefix(_LIBRARY_PREFIX)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    header_len = int.from_bytes(head[:8], "little") if size >= 8 else None
    # A real header may begin with 0x80 (its length's low byte), so only call it a pickle or a
    # zip archive when the bytes do not also make sense as safetensors.
    plausible = header_len is not None and header_len <= size - 8 and head[8:9] == b"{"
    if not plausible and head[:2] == b"PK":
        if _zip_kind(path) == "npz":
            return "this is a .npz archive, not safetensors; give it the .npz suffix"
        return PICKLE_MESSAGE
    if not plausible and head[:1] == b"\x80":
        return PICKLE_MESSAGE
    if header_len is None:
        return f"file is {size} bytes, too short for the 8-byte safetensors header length (truncated?)"
    if header_len > size - 8:
        return (
            f"header length {header_len} is larger than the {size - 8} bytes after it "
            "(truncated or not a safetensors file)"
        )
    if "not fully covered" in detail:
        return _data_size_problem(path, header_len, size)
    if "too large" in detail:
        return f"header length {header_len} is over the safetensors limit; not a safetensors file? ({detail})"
    if detail.startswith(("invalid offset", "invalid shape")):
        detail += (
            "; each tensor's data_offsets must span its shape times its dtype's size and begin where the "
            "previous tensor ends"
        )
    return f"corrupted safetensors header: {detail}"


def _data_size_problem(path: Path, header_len: int, size: int) -> str:
    """Truncated or trailing bytes: the library only says the data does not match the header."""
    available = size - 8 - header_len
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(header_len))
        # The library has checked the header, so the tensors' bytes are contiguous from 0.
        needed = max((e["data_offsets"][1] for k, e in header.items() if k != METADATA_KEY), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"the {available} bytes of tensor data do not match the header (truncated, or trailing bytes)"
    if available < needed:
        return f"truncated: the header describes {needed} bytes of tensor data, but only {available} follow it"
    return f"{available - needed} trailing bytes after the last tensor (the header describes {needed} bytes of data)"


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
