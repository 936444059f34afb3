"""The data sets ``densenet train --dataset`` names, opened the same way: both splits, the class
names, and what ``run.json`` records about them."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from common.data import cifar10, fashion_mnist, folder
from common.data.pipeline import DataError, Split

DATASETS = ("fashion-mnist", "cifar10", "folder")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    """Both splits of a data set. ``test`` is what each epoch evaluates on (``test_name``: the
    official test split, or an image folder's validation split). ``channels`` is what the images
    hold before the pipeline converts them to the network's; ``info`` goes into ``run.json``, and
    ``info["sha256"]`` identifies the data (a resumed run must read the same)."""

    name: str
    train: Split
    test: Split
    classes: list[str]
    channels: int
    test_name: str = "test"
    info: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_note(self, in_channels: int) -> str | None:
        """What the pipeline does to the images' channels for a network of ``in_channels``, if anything."""
        if self.channels == in_channels:
            return None
        how = "their luma (grey)" if in_channels == 1 else "grey repeated into each channel"
        return (
            f"{self.name} images have {self.channels} channel(s) and the network in_channels={in_channels}: "
            f"fed as {how}"
        )


def _files_digest(files: dict[str, dict[str, object]]) -> str:
    return hashlib.sha256("".join(f"{k}\t{v['sha256']}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def open_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    channels: int = 1,
    size: int = 96,
    val_fraction: float | None = None,
) -> Dataset:
    """The data set ``name`` (one of ``DATASETS``) from ``data_dir``.

    Fashion-MNIST is looked for as :func:`common.data.fashion_mnist.find` says (and downloaded,
    with checksums, only when no directory is named and no copy exists); CIFAR-10 and image
    folders are read only from the ``data_dir`` given. A folder's images are read at ``size`` and
    ``channels`` already; the others are converted batch by batch.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    if val_fraction is not None and name != "folder":
        raise DataError(f"--val-fraction splits an image folder; {name} has its own test split")
    if name == "folder":
        found = folder.load(data_dir, channels, size, val_fraction)
        # Images were converted as they were read; say so as for the other data sets.
        native = (4 - channels) if found.info["converted_channels"] else channels
        return Dataset(name, found.train, found.val, found.classes, native, "val", {"name": name, **found.info})
    if name == "cifar10":
        directory = cifar10.find(data_dir)
        train, test = cifar10.load("train", directory), cifar10.load("test", directory)
        classes, native, files = list(cifar10.CLASSES), 3, cifar10.files_used(directory)
    else:
        directory = fashion_mnist.find(data_dir)
        train, test = fashion_mnist.load("train", directory), fashion_mnist.load("test", directory)
        classes, native, files = list(FASHION_MNIST_CLASSES), 1, fashion_mnist.files_used(directory)
    info = {"name": name, "dir": str(directory.resolve()), "files": files, "sha256": _files_digest(files)}
    return Dataset(name, train, test, classes, native, "test", info)
