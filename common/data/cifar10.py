"""CIFAR-10 in its binary format, read from a directory the user names (never downloaded).

The "CIFAR-10 binary version" (https://www.cs.toronto.edu/~kriz/cifar.html) extracts to
``cifar-10-batches-bin/``: ``data_batch_1.bin`` ... ``data_batch_5.bin`` (training) and
``test_batch.bin``, each a sequence of 3073-byte records: one label byte (0-9), then the 32x32
image as 1024 red, 1024 green and 1024 blue bytes, rows first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.data.pipeline import DataError, Split, file_record

TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
RECORD = 1 + 3 * 32 * 32
SUBDIR = "cifar-10-batches-bin"  # what the official archive extracts to
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def find(data_dir: str | os.PathLike | None) -> Path:
    """The directory holding the six files: ``data_dir`` itself or its ``cifar-10-batches-bin``."""
    if data_dir is None:
        raise DataError(
            f"--dataset cifar10 needs --data-dir: the directory of the binary files ({', '.join(TRAIN_FILES[:1])} "
            f"... test_batch.bin). Nothing is downloaded: get {SOURCE} and extract it"
        )
    directory = Path(data_dir)
    if not directory.exists():
        raise DataError(f"--data-dir {directory} does not exist")
    if not directory.is_dir():
        raise DataError(f"--data-dir {directory} is not a directory")
    if not (directory / TRAIN_FILES[0]).exists() and (directory / SUBDIR).is_dir():
        directory = directory / SUBDIR
    missing = [name for name in (*TRAIN_FILES, *TEST_FILES) if not (directory / name).is_file()]
    if missing:
        raise DataError(
            f"--data-dir {directory} lacks {len(missing)} of the 6 CIFAR-10 binary files ({', '.join(missing)}); "
            f"expected data_batch_1.bin ... data_batch_5.bin and test_batch.bin (from {SOURCE})"
        )
    return directory


def read_batch(path: str | os.PathLike) -> Split:
    """One binary batch file: uint8 images (N, 3, 32, 32) and int64 labels (N,), validated."""
    path = Path(path)
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw.size == 0 or raw.size % RECORD:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte CIFAR-10 records "
            f"({raw.size // RECORD} records and {raw.size % RECORD} bytes over): truncated, or not a CIFAR-10 "
            "binary file"
        )
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{path}: record {bad} has label {labels[bad]}; CIFAR-10 labels are 0-9 (not CIFAR-100?)")
    return Split(records[:, 1:].reshape(-1, 3, 32, 32), labels)


def load(split: str, data_dir: str | os.PathLike | None) -> Split:
    """The ``train`` (the five data batches, in order) or ``test`` split."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    directory = find(data_dir)
    parts = [read_batch(directory / name) for name in (TRAIN_FILES if split == "train" else TEST_FILES)]
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def files_used(directory: str | os.PathLike) -> dict[str, dict[str, object]]:
    """Each file a run read, with its size and SHA-256 (for ``run.json``)."""
    return {name: file_record(Path(directory) / name) for name in (*TRAIN_FILES, *TEST_FILES)}
