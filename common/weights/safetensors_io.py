"""Weight files without pickle: safetensors through the ``safetensors`` package, and plain ``.npz``.

The ``safetensors`` package (its numpy API, which imports no ML framework) parses and encodes the
format. What this module adds: atomic writes, the tensors' order, ``.npz`` without pickle, and one
:class:`~common.errors.WeightFileError` per bad file, naming it and saying what is wrong where the
library's own words are terse.
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
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise WeightFileError(f"{path}: metadata must map strings to strings, got {key!r}: {value!r}")
    if ORDER_KEY in (metadata or {}):
        raise WeightFileError(f"{path}: metadata key {ORDER_KEY!r} is reserved for the tensors' order")
    return arrays


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a temporary sibling, fsync it and rename it over ``path``: a crash leaves the old
    file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # "x" creates the file with the umask's mode (mkstemp would force 0600), never reusing one.
        f = open(tmp, "xb")
    except OSError as e:
        raise WeightFileError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with f:
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
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
    _atomic_write(path, lambda f: f.write(data))


def load_file(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: ``(tensors in the order they were written, metadata)``. Never unpickles."""
    path = Path(path)
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            names = f.offset_keys()
            for name in names:
                # Checked first: the library fails on e.g. BF16 with numpy's own TypeError.
                code = f.get_slice(name).get_dtype()
                if code not in _DTYPES:
                    raise WeightFileError(
                        f"{path}: tensor {name!r} has unsupported dtype {code!r}; "
                        f"densenet-suite reads {', '.join(_DTYPES)}"
                    )
            # require() copies where the library's array is unaligned or read-only.
            tensors = {name: np.require(f.get_tensor(name), requirements=["C", "A", "W"]) for name in names}
    except FileNotFoundError:
        raise WeightFileError(f"{path}: file not found") from None
    except safetensors.SafetensorError as e:
        raise WeightFileError(f"{path}: {_explain(path, str(e).removeprefix(_LIBRARY_PREFIX))}") from None
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


def _prefix_problem(path: Path, detail: str) -> str:
    """The 8-byte header length was refused: often not a safetensors file at all."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError), zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if names and all(n.endswith(".npy") for n in names):
                return "this is a .npz archive, not safetensors; give it the .npz suffix"
        return PICKLE_MESSAGE  # torch.save's zip archive; anything else zipped is no weight file either
    if head[:1] == b"\x80":
        return PICKLE_MESSAGE
    if size < 8:
        return f"file is {size} bytes, too short for the 8-byte safetensors header length (truncated?)"
    length = int.from_bytes(head, "little")
    if length > size - 8:
        return (
            f"header length {length} is larger than the {size - 8} bytes after it (truncated or not a safetensors file)"
        )
    return f"header length {length} is over the safetensors limit; not a safetensors file? ({detail})"


def _data_size_problem(path: Path, detail: str) -> str:
    """Truncated or trailing bytes: the library only says that the data does not match the header,
    and counting needs the header's last offset (the library checked the header before saying so)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    available = path.stat().st_size - 8 - length
    needed = max((e["data_offsets"][1] for k, e in header.items() if k != METADATA_KEY), default=0)
    if available < needed:
        return f"truncated: the header describes {needed} bytes of tensor data, but only {available} follow it"
    return f"{available - needed} trailing bytes after the last tensor (the header describes {needed} bytes of data)"


def _offsets_problem(path: Path, detail: str) -> str:
    return (
        f"corrupted safetensors header: {detail}; each tensor's data_offsets must span its shape times "
        "its dtype's size and begin where the previous tensor ends"
    )


# The library's refusals whose words need more, by a fragment of its message; the rest read well
# enough as "corrupted safetensors header: <its message>".
_EXPLANATIONS: dict[str, Callable[[Path, str], str]] = {
    "header too small": _prefix_problem,
    "invalid header length": _prefix_problem,
    "header too large": _prefix_problem,
    "not fully covered": _data_size_problem,
    "invalid offset": _offsets_problem,
    "invalid shape": _offsets_problem,
}


def _explain(path: Path, detail: str) -> str:
    explain = next((f for fragment, f in _EXPLANATIONS.items() if fragment in detail), None)
    if explain is None:
        return f"corrupted safetensors header: {detail}"
    try:
        return explain(path, detail)
    except (OSError, ValueError) as e:  # the file changed or went away since the library read it
        return f"cannot read: {getattr(e, 'strerror', None) or e}"


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
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise WeightFileError(f"{path}: file not found") from None
    except ValueError as e:
        # numpy takes what is neither a zip nor a .npy for a pickle, and refuses it.
        problem = PICKLE_MESSAGE if "pickle" in str(e) else f"not a valid .npz file: {e}"
        raise WeightFileError(f"{path}: {problem}") from None
    except (EOFError, zipfile.BadZipFile) as e:
        raise WeightFileError(f"{path}: not a valid .npz file: {e}") from None
    except OSError as e:
        raise WeightFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise WeightFileError(f"{path}: this is a single .npy array, not a .npz archive of named tensors")
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    with loaded:
        if any(name.endswith(".pkl") for name in loaded.files):  # torch.save's zip archive
            raise WeightFileError(f"{path}: {PICKLE_MESSAGE}")
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
                metadata = _npz_metadata(array, path)
                continue
            _supported_dtype(name, array, path)
            tensors[name] = array.astype(array.dtype.newbyteorder("=")) if not array.dtype.isnative else array
    return tensors, metadata


def _npz_metadata(array: np.ndarray, path: Path) -> dict[str, str]:
    if array.ndim != 0 or array.dtype.kind != "U":
        raise WeightFileError(
            f"{path}: {METADATA_KEY} must be a 0-d unicode string of JSON, got dtype {array.dtype} shape {array.shape}"
        )
    try:
        meta = json.loads(str(array[()]))
    except ValueError as e:
        raise WeightFileError(f"{path}: {METADATA_KEY} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise WeightFileError(f"{path}: {METADATA_KEY} must be a JSON object, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise WeightFileError(f"{path}: {METADATA_KEY} values must be strings, but {key!r} is {json.dumps(value)}")
    return meta


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
