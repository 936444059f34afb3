"""Fashion-MNIST files and the shared input pipeline."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from common import data
from common.data import fashion_mnist


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None, extra: bytes = b"", cut: int = 0) -> None:
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes() + extra
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - cut] if cut else raw)


def make_dataset(directory: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """A learnable stand-in: class k has a bright 6x6 square at a position of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            r, c = 2 + 6 * (k // 4), 2 + 6 * (k % 4)
            images[i, r : r + 6, c : c + 6] = 255
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "fmnist")


def test_reads_generated_files(dataset: Path) -> None:
    train = data.load("train", dataset, download=False)
    assert train.images.shape == (256, 28, 28) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.labels.max() <= 9
    with pytest.raises(data.DataError, match="256 items, expected 60000"):
        data.load("train", dataset, download=False, strict_counts=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magic": b"\x00\x00\x09\x03"}, "bad IDX magic number"),
        ({"magic": b"\x00\x00\x08\x02"}, "2 dimensions, expected 3"),
        ({"cut": 100}, "truncated"),
        ({"extra": b"xx"}, "trailing bytes"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = tmp_path / "images.gz"
    write_idx(path, np.zeros((4, 28, 28)), **kwargs)
    with pytest.raises(data.DataError, match=message):
        data.read_idx(path, 3)


def test_not_gzip_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x.gz").write_bytes(b"plain bytes")
    with pytest.raises(data.DataError, match="not a readable gzip file"):
        data.read_idx(tmp_path / "x.gz", 3)
    with pytest.raises(data.DataError, match="file not found"):
        data.read_idx(tmp_path / "nope.gz", 3)


def test_label_range_and_count_mismatch(dataset: Path) -> None:
    write_idx(dataset / "t10k-labels-idx1-ubyte.gz", np.full(128, 11))
    with pytest.raises(data.DataError, match="labels must be 0-9"):
        data.load("test", dataset, download=False)
    write_idx(dataset / "t10k-labels-idx1-ubyte.gz", np.zeros(100))
    with pytest.raises(data.DataError, match="128 test images but 100 labels"):
        data.load("test", dataset, download=False)


def test_search_order(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = make_dataset(tmp_path / "env", n_train=64)
    monkeypatch.setenv(data.ENV_VAR, str(other))
    assert data.find(dataset, download=False) == dataset  # --data-dir first
    assert data.find(None, download=False) == other  # then the environment variable
    monkeypatch.delenv(data.ENV_VAR)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(data.DataError, match="Fashion-MNIST not found"):
        data.find(None, download=False)


def test_download_verifies_checksums(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file:// mirror stands in for the official server (no network in tests)."""
    md5 = {name: hashlib.md5((dataset / name).read_bytes()).hexdigest() for name in data.FILES.values()}
    monkeypatch.setattr(fashion_mnist, "MD5", md5)
    target = data.fetch(tmp_path / "cache", url=dataset.as_uri() + "/")
    assert all((target / name).read_bytes() == (dataset / name).read_bytes() for name in data.FILES.values())
    monkeypatch.setattr(fashion_mnist, "MD5", {**md5, "t10k-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(data.DataError, match="fails its checksum"):
        data.fetch(tmp_path / "cache2", url=dataset.as_uri() + "/")
    assert not (tmp_path / "cache2" / "t10k-images-idx3-ubyte.gz").exists()
    assert [p.name for p in (tmp_path / "cache2").iterdir() if p.name.startswith("tmp")] == []


def test_preprocess() -> None:
    images = np.full((2, 28, 28), 51, np.uint8)
    X = data.preprocess(images, 96)
    assert X.shape == (2, 1, 96, 96) and X.dtype == np.float32
    np.testing.assert_allclose(X, 0.2, atol=1e-6)  # a constant image stays constant
    same = data.preprocess(np.arange(784, dtype=np.uint8).reshape(1, 28, 28) % 256, None)
    assert same.shape == (1, 1, 28, 28)


def test_bilinear_resize_matches_pytorch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    for size in (32, 96):
        ours = data.preprocess(images, size)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(images[:, None].astype(np.float32) / 255),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        ).numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_batches_are_seeded_per_epoch(dataset: Path) -> None:
    split = data.load("train", dataset, download=False)

    def labels(seed: int, epoch: int) -> np.ndarray:
        return np.concatenate([y for _, y in data.batches(split, 100, 32, seed=seed, epoch=epoch)])

    assert np.array_equal(labels(0, 0), labels(0, 0))
    assert not np.array_equal(labels(0, 0), labels(0, 1))
    assert not np.array_equal(labels(0, 0), labels(1, 0))
    assert sorted(labels(0, 3)) == sorted(split.labels)  # every example once per epoch
    sizes = [len(y) for _, y in data.batches(split, 100, 32)]
    assert sizes == [100, 100, 56]
    unshuffled = np.concatenate([y for _, y in data.batches(split, 100, 32, shuffle=False)])
    assert np.array_equal(unshuffled, split.labels)


@pytest.mark.skipif(not data.DEBIAN_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_real_fashion_mnist() -> None:
    train = data.load("train", data.DEBIAN_DIR, download=False, strict_counts=True)
    test = data.load("test", data.DEBIAN_DIR, download=False, strict_counts=True)
    assert train.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
