"""Fashion-MNIST: finding, validating and reading the IDX files, and one input pipeline for all
four backends (scale to [0, 1], bilinear resize, seeded per-epoch shuffle, batches).

The same seed gives the same batches, in the same order, whichever backend consumes them.
Nothing here imports a framework.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.distributed.sharding import shard_batches
from common.errors import DenseNetError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# MD5 of the official gzipped files (Zalando's fashion-mnist repository README).
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
COUNTS = {"train": 60_000, "test": 10_000}
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DENSENET_DATA_DIR"


class DataError(DenseNetError, ValueError):
    """A missing, truncated or malformed data file."""


class DownloadError(DataError):
    """No copy of the files anywhere, and downloading one failed."""

    exit_status = 1


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "densenet-suite" / "fashion-mnist"


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the files are looked for: the directory the user named (``--data-dir``, else
    $DENSENET_DATA_DIR), which is used or refused, never passed over; without one, the per-user
    cache, then the Debian package's directory."""
    named = named_dir(data_dir)
    if named is not None:
        return [named[0]]
    return [cache_dir(), DEBIAN_DIR]


def named_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """The directory the user named and how (``--data-dir`` or the environment variable), if any."""
    if data_dir is not None:
        return Path(data_dir), "--data-dir"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    return None


def _missing(directory: Path) -> list[str]:
    return [name for name in FILES.values() if not (directory / name).is_file()]


def find(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The directory holding the four files.

    A directory the user named (``data_dir``, else $DENSENET_DATA_DIR) is used if it holds all
    four files and refused with a :class:`DataError` saying what is missing otherwise: a path the
    user names is never silently replaced by another copy or a download. Without one: the cache,
    then the Debian package's directory, then (``download``) a verified download into the cache.
    """
    named = named_dir(data_dir)
    if named is not None:
        directory, how = named
        if not directory.exists():
            raise DataError(f"{how} {directory} does not exist")
        if not directory.is_dir():
            raise DataError(f"{how} {directory} is not a directory")
        missing = _missing(directory)
        if missing:
            has = sorted(p.name for p in directory.iterdir())[:6]
            raise DataError(
                f"{how} {directory} lacks {len(missing)} of the 4 Fashion-MNIST files ({', '.join(missing)}); "
                f"it holds {', '.join(has) if has else 'nothing'}. A named directory is used as it is, never "
                f"replaced by another copy: complete it, or name none to use the system copy or download one"
            )
        return directory
    for d in candidate_dirs():
        if not _missing(d):
            return d
    looked = ", ".join(str(d) for d in candidate_dirs())
    if download:
        try:
            return fetch(cache_dir())
        except OSError as exc:
            raise DownloadError(
                f"Fashion-MNIST not found in {looked}, and downloading it failed ({exc}). "
                "Install the Debian package (apt-get install dataset-fashion-mnist) or pass --data-dir"
            ) from None
    raise DataError(f"Fashion-MNIST not found in {looked}")


def files_used(directory: str | os.PathLike) -> dict[str, dict[str, object]]:
    """What a run read, for its ``run.json``: each file's path, size and SHA-256."""
    directory = Path(directory)
    out: dict[str, dict[str, object]] = {}
    for key, name in FILES.items():
        path = (directory / name).resolve()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[key] = {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def fetch(directory: Path, url: str = URL, timeout: float = 30.0) -> Path:
    """Download the official files into ``directory``, verifying each MD5 before keeping it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        target = directory / name
        if target.is_file() and _md5(target) == MD5[name]:
            continue
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url + name, timeout=timeout) as response:
                    shutil.copyfileobj(response, tmp)
                tmp.close()
                if _md5(Path(tmp.name)) != MD5[name]:
                    raise DataError(f"downloaded {name} fails its checksum; not kept")
                os.replace(tmp.name, target)
            finally:
                if os.path.exists(tmp.name):
                    os.unlink(tmp.name)
    return directory


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_idx(path: str | os.PathLike, expected_ndim: int, expected_count: int | None = None) -> np.ndarray:
    """One gzipped IDX file as uint8 (images (N, 28, 28), labels (N,)), fully validated."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}); re-download it") from None
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: bad IDX magic number {data[:4].hex()} (expected 0000 08 0{expected_ndim})")
    if ndim != expected_ndim:
        raise DataError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise DataError(
            f"{path}: header says {'x'.join(map(str, shape))} = {size} bytes of data, file has {len(data) - header}"
            + (" (truncated)" if len(data) - header < size else " (trailing bytes)")
        )
    if expected_count is not None and shape[0] != expected_count:
        raise DataError(f"{path}: {shape[0]} items, expected {expected_count}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64


def load(split: str, data_dir: str | os.PathLike | None = None, download: bool = True, strict_counts: bool = False):
    """The ``train`` or ``test`` split as uint8 images and int64 labels.

    Every file is validated (magic number, dimensions, header against data size, images against
    labels); ``strict_counts`` also requires the official 60,000/10,000 examples.
    """
    if split not in COUNTS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    directory = find(data_dir, download)
    count = COUNTS[split] if strict_counts else None
    images = read_idx(directory / FILES[f"{split}_images"], 3, count)
    labels = read_idx(directory / FILES[f"{split}_labels"], 1, count)
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{directory}: {split} labels must be 0-9, found {labels.max()}")
    return Split(images, labels.astype(np.int64))


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of half-pixel-centred bilinear resizing along one axis (as
    torchvision's Resize and tf.image.resize do, without antialiasing)."""
    scale = n_in / n_out
    x = (np.arange(n_out) + 0.5) * scale - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = x - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def preprocess(images: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, size, size) in [0, 1], bilinearly resized."""
    X = images.astype(np.float32) / 255.0
    if size is not None and size != images.shape[-1]:
        rows = _bilinear_matrix(images.shape[1], size).astype(np.float32)
        cols = _bilinear_matrix(images.shape[2], size).astype(np.float32)
        X = rows @ X @ cols.T  # two small matmuls per image, batched
    return X[:, None]


def batches(
    split: Split,
    batch_size: int,
    size: int | None,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """NCHW float32 batches and labels; the order depends only on ``(seed, epoch)``.

    ``shard=(rank, world)``: only worker ``rank``'s share of every batch of ``batch_size``
    (``common.distributed.sharding.shard_batches``)."""
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    order = np.arange(len(split.labels))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(order)
    if shard is not None:
        chunks = shard_batches(order, batch_size, *shard)
    else:
        chunks = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
    for idx in chunks:
        yield preprocess(split.images[idx], size), split.labels[idx]


def subset(split: Split, limit: int | None) -> Split:
    """The first ``limit`` examples (all when None)."""
    if limit is None:
        return split
    if limit < 1:
        raise DataError(f"--limit must be positive, got {limit}")
    return Split(split.images[:limit], split.labels[:limit])
