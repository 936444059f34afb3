"""Data sets and the one input pipeline every backend trains from (nothing here imports a framework).

- :mod:`common.data.pipeline`: scale, convert channels, resize, shuffle and batch (seeded);
- :mod:`common.data.augment`: random crop with padding and horizontal flip, seeded per example;
- :mod:`common.data.fashion_mnist`, :mod:`common.data.cifar10`, :mod:`common.data.folder`: the
  data sets ``densenet train --dataset`` reads, opened by name with :func:`open_dataset`.

``from common import data`` gives the names of all of them (``data.load`` is Fashion-MNIST's).
"""

from common.data.augment import padding
from common.data.datasets import DATASETS, Dataset, open_dataset
from common.data.fashion_mnist import (
    COUNTS,
    DEBIAN_DIR,
    ENV_VAR,
    FILES,
    MD5,
    URL,
    DownloadError,
    cache_dir,
    candidate_dirs,
    fetch,
    files_used,
    find,
    load,
    named_dir,
    read_idx,
)
from common.data.pipeline import DataError, Split, batches, convert_channels, preprocess, subset

__all__ = [
    "COUNTS",
    "DATASETS",
    "DEBIAN_DIR",
    "ENV_VAR",
    "FILES",
    "MD5",
    "URL",
    "DataError",
    "Dataset",
    "DownloadError",
    "Split",
    "batches",
    "cache_dir",
    "candidate_dirs",
    "convert_channels",
    "fetch",
    "files_used",
    "find",
    "load",
    "named_dir",
    "open_dataset",
    "padding",
    "preprocess",
    "read_idx",
    "subset",
]
