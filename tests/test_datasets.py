"""CIFAR-10's binary files, image folders, channel conversion and the seeded augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common import data
from common.data import augment, cifar10, folder

PIL = pytest.importorskip("PIL.Image")


def make_cifar(directory: Path, per_file: int = 6, seed: int = 0, subdir: bool = False) -> Path:
    """Six small CIFAR-10 binary files: records of a label byte and 3072 pixel bytes (R, G, B planes)."""
    target = directory / cifar10.SUBDIR if subdir else directory
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in (*cifar10.TRAIN_FILES, *cifar10.TEST_FILES):
        records = rng.integers(0, 256, (per_file, cifar10.RECORD), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, per_file)
        (target / name).write_bytes(records.tobytes())
    return directory


def make_folder(root: Path, classes: dict[str, int], *, mode: str = "RGB", seed: int = 0, suffix: str = ".png") -> Path:
    """One folder of small images per class, of varying sizes; class k is bright in its own corner."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            side = int(rng.integers(12, 20))
            pixels = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
            r, c = (k // 2) * (side // 2), (k % 2) * (side // 2)
            pixels[r : r + side // 2, c : c + side // 2] = 255
            image = PIL.fromarray(pixels, "RGB").convert(mode)
            image.save(root / name / f"{i:03d}{suffix}")
    return root


# ------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar_binary_records_are_read_plane_by_plane(tmp_path: Path) -> None:
    make_cifar(tmp_path, per_file=4)
    raw = np.frombuffer((tmp_path / "data_batch_2.bin").read_bytes(), np.uint8).reshape(4, cifar10.RECORD)
    train = cifar10.load("train", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.labels.shape == (20,)
    first_of_file_2 = train.images[4]  # the five files in order, four records each
    assert np.array_equal(first_of_file_2[0].ravel(), raw[0, 1:1025])  # red plane, rows first
    assert np.array_equal(first_of_file_2[2].ravel(), raw[0, 2049:])  # blue plane last
    assert train.labels[4] == raw[0, 0]
    assert cifar10.load("test", tmp_path).images.shape == (4, 3, 32, 32)
    # The directory the official archive extracts to is found inside the one named.
    make_cifar(tmp_path / "outer", subdir=True)
    assert cifar10.find(tmp_path / "outer") == tmp_path / "outer" / cifar10.SUBDIR


def test_bad_cifar_files_are_named(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(data.DataError, match=r"data_batch_3\.bin: 18433 bytes is not a whole number"):
        cifar10.load("train", tmp_path)
    records = np.zeros((2, cifar10.RECORD), np.uint8)
    records[1, 0] = 57
    path.write_bytes(records.tobytes())
    with pytest.raises(data.DataError, match=r"data_batch_3\.bin: record 1 has label 57"):
        cifar10.load("train", tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(data.DataError, match=r"lacks 1 of the 6 CIFAR-10 binary files \(test_batch\.bin\)"):
        cifar10.find(tmp_path)
    with pytest.raises(data.DataError, match="does not exist"):
        cifar10.find(tmp_path / "nope")
    with pytest.raises(data.DataError, match="needs --data-dir.*Nothing is downloaded"):
        data.open_dataset("cifar10", None)


# ------------------------------------------------------------------------------------------------
# Image folders


def test_folder_of_classes_is_split_per_class_and_seeded(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "pics", {"cat": 10, "dog": 20, "emu": 5})
    (root / "cat" / "notes.txt").write_text("not an image: left alone")
    (root / "dog" / ".hidden.png").write_bytes(b"left alone too")
    found = folder.load(root, 3, 16, val_fraction=0.2)
    assert found.classes == ["cat", "dog", "emu"]
    assert np.bincount(found.val.labels).tolist() == [2, 4, 1]
    assert np.bincount(found.train.labels).tolist() == [8, 16, 4]
    assert found.train.images.shape == (28, 3, 16, 16) and found.train.images.dtype == np.uint8
    again = folder.load(root, 3, 16, val_fraction=0.2)
    assert np.array_equal(again.val.images, found.val.images) and again.info["sha256"] == found.info["sha256"]
    default = folder.load(root, 3, 16)
    assert np.bincount(default.val.labels, minlength=3).tolist() == [1, 2, 0]  # round(0.1 * n); 0.5 rounds to even
    # Grey: Pillow's luma; the colour image's corner stays bright.
    grey = folder.load(root, 1, 16, val_fraction=0.2)
    assert grey.train.images.shape == (28, 1, 16, 16)
    assert grey.train.images[0, 0, 0, 0] > 200  # class 0 is bright top-left


def test_folder_with_train_and_val_folders(tmp_path: Path) -> None:
    make_folder(tmp_path / "pics" / "train", {"a": 4, "b": 3}, mode="L")
    make_folder(tmp_path / "pics" / "val", {"a": 2, "b": 2}, mode="L", suffix=".jpg")
    found = folder.load(tmp_path / "pics", 3, 12)
    assert len(found.train.labels) == 7 and len(found.val.labels) == 4
    assert found.info["layout"] == "train/ and val/ folders"
    image = found.train.images[0]
    assert np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2])  # grey repeated
    with pytest.raises(data.DataError, match="train/ and val/ folders, which are the split"):
        folder.load(tmp_path / "pics", 3, 12, val_fraction=0.2)
    (tmp_path / "pics" / "val" / "c").mkdir()
    (tmp_path / "pics" / "val" / "c" / "x.png").write_bytes((tmp_path / "pics" / "val" / "a" / "000.jpg").read_bytes())
    with pytest.raises(data.DataError, match="only in train/: -; only in val/: c"):
        folder.load(tmp_path / "pics", 3, 12)


def test_deep_grey_images_are_scaled_by_their_bit_depth(tmp_path: Path) -> None:
    """A 16-bit grey PNG keeps its brightness: Pillow's own conversion clipped it (mean 128 of
    255 came out 254.6). The mean after loading is the file's, scaled to 8 bits."""
    rng = np.random.default_rng(0)
    means = []
    for name in ("dark", "mid"):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(3):
            high = 20000 if name == "dark" else 65535
            pixels = rng.integers(0, high, (16, 16)).astype(np.uint16)
            PIL.fromarray(pixels).save(tmp_path / "pics" / name / f"{i}.png")
            means.append(pixels.mean() / 65535 * 255)
    with PIL.open(tmp_path / "pics" / "mid" / "0.png") as image:
        assert image.mode == "I;16"  # what the test is about: Pillow reads 16 bits
    found = folder.load(tmp_path / "pics", 1, 16, val_fraction=0.34)
    images = np.concatenate([found.train.images, found.val.images]).astype(np.float64)
    labels = np.concatenate([found.train.labels, found.val.labels])
    for label, expected in ((0, np.mean(means[:3])), (1, np.mean(means[3:]))):
        assert images[labels == label].mean() == pytest.approx(expected, abs=0.5)  # rounding to 8 bits
    assert images.max() > 200 and images[labels == 0].max() < 80  # scaled, not clipped
    # As colour: the grey repeated into each channel, at the same brightness.
    rgb = folder.load(tmp_path / "pics", 3, 16, val_fraction=0.34)
    assert np.array_equal(rgb.train.images[:, 0], found.train.images[:, 0])
    assert np.array_equal(rgb.train.images[:, 2], found.train.images[:, 0])


def test_full_scale_of_each_deep_mode() -> None:
    png16 = b"\x89PNG\r\n\x1a\n" + bytes(16) + bytes([16])
    assert folder._full_scale("I;16", b"") == folder._full_scale("I;16B", b"") == 65535
    assert folder._full_scale("I", png16) == 65535  # older Pillow: a 16-bit PNG as 32-bit integers
    assert folder._full_scale("F", b"") == 1.0
    assert folder._full_scale("L", b"") is None and folder._full_scale("RGB", b"") is None


def test_bad_folders_and_images_are_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "pics", {"a": 3, "b": 3})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "a" / "empty.jpg").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"2 of the \d images .* cannot be read") as info:
        folder.load(root, 3, 16, val_fraction=0.5)
    assert "broken.png" in str(info.value) and "empty.jpg" in str(info.value)
    (root / "c").mkdir()
    with pytest.raises(data.DataError, match="class folder .*c holds no images"):
        folder.load(root, 3, 16, val_fraction=0.5)
    with pytest.raises(data.DataError, match="does not exist"):
        folder.load(tmp_path / "nope", 3, 16)
    with pytest.raises(data.DataError, match="needs --data-dir"):
        folder.load(None, 3, 16)
    with pytest.raises(data.DataError, match="holds no class folders"):
        folder.load(root / "a", 3, 16)
    with pytest.raises(data.DataError, match="1 .grey. or 3 .RGB. channels, not in_channels=2"):
        folder.load(make_folder(tmp_path / "ok", {"a": 2, "b": 2}), 2, 16)
    with pytest.raises(data.DataError, match="one class folder"):
        folder.load(make_folder(tmp_path / "one", {"a": 4}), 3, 16)
    with pytest.raises(data.DataError, match="--val-fraction splits an image folder"):
        data.open_dataset("fashion-mnist", None, val_fraction=0.2)


# ------------------------------------------------------------------------------------------------
# Channels and augmentation


def test_channel_conversion() -> None:
    X = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    grey = data.convert_channels(X, 1)
    np.testing.assert_allclose(grey[:, 0], 0.299 * X[:, 0] + 0.587 * X[:, 1] + 0.114 * X[:, 2], rtol=1e-6)
    assert np.array_equal(data.convert_channels(grey, 3), np.repeat(grey, 3, axis=1))
    with pytest.raises(data.DataError, match="3 channel.* in_channels=2"):
        data.convert_channels(X, 2)
    # Fashion-MNIST's (N, H, W) images feed a 3-channel network.
    assert data.preprocess(np.zeros((2, 28, 28), np.uint8), 32, 3).shape == (2, 3, 32, 32)


def _reference_augment(X: np.ndarray, pad: int, offset: tuple[int, int], flip: bool) -> np.ndarray:
    """One image (C, H, W), the plain way: pad, crop, flip."""
    padded = np.pad(X, ((0, 0), (pad, pad), (pad, pad)))
    out = padded[:, offset[0] : offset[0] + X.shape[1], offset[1] : offset[1] + X.shape[2]]
    return out[:, :, ::-1] if flip else out


def test_augmentation_depends_only_on_seed_epoch_and_index() -> None:
    rng = np.random.default_rng(1)
    split = data.Split(rng.integers(0, 256, (40, 3, 20, 20), dtype=np.uint8), np.arange(40) % 10)

    def per_example(batch_size: int, *, seed: int = 3, epoch: int = 2, shuffle: bool = True) -> np.ndarray:
        out = np.empty((40, 3, 16, 16), np.float32)
        order = np.random.default_rng([seed, epoch]).permutation(40) if shuffle else np.arange(40)
        images = np.concatenate(
            [X for X, _ in data.batches(split, batch_size, 16, seed=seed, epoch=epoch, shuffle=shuffle, augment=True)]
        )
        out[order] = images
        return out

    base = per_example(8)
    assert np.array_equal(per_example(3), base)  # another batch size
    assert np.array_equal(per_example(40, shuffle=False), base)  # no shuffle
    assert not np.array_equal(per_example(8, epoch=3), base)
    assert not np.array_equal(per_example(8, seed=4), base)
    # Each image is the pad-crop-flip of its plain version, with this epoch's draw.
    plain = data.preprocess(split.images, 16)
    draws = augment.draw(40, 16, 3, 2)
    assert draws.pad == augment.padding(16) == 2
    for i in range(40):
        expected = _reference_augment(plain[i], draws.pad, tuple(draws.offsets[i]), bool(draws.flips[i]))
        assert np.array_equal(base[i], expected), i
    big = augment.draw(10_000, 32, 0, 0)
    assert big.pad == 4 and big.offsets.min() == 0 and big.offsets.max() == 8
    assert 0.45 < big.flips.mean() < 0.55
    assert augment.padding(96) == 12 and augment.padding(4) == 1


def test_augmentation_padding_is_chosen() -> None:
    """``augment_padding`` replaces side // 8; 0 leaves only the flips."""
    rng = np.random.default_rng(2)
    split = data.Split(rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8), np.arange(12) % 10)
    plain = data.preprocess(split.images, 16)

    def images(pad: int | None) -> np.ndarray:
        batches = data.batches(split, 5, 16, seed=1, epoch=0, shuffle=False, augment=True, augment_padding=pad)
        return np.concatenate([X for X, _ in batches])

    flips_only = images(0)
    zero = augment.draw(12, 16, 1, 0, pad=0)
    assert zero.pad == 0 and not zero.offsets.any() and 0 < zero.flips.sum() < 12
    assert np.array_equal(flips_only, np.where(zero.flips[:, None, None, None], plain[..., ::-1], plain))
    three = augment.draw(12, 16, 1, 0, pad=3)
    assert three.pad == 3 and three.offsets.max() <= 6
    padded = images(3)
    for i in range(12):
        assert np.array_equal(padded[i], _reference_augment(plain[i], 3, tuple(three.offsets[i]), bool(three.flips[i])))
    with pytest.raises(ValueError, match="0 or more pixels, got -1"):
        augment.draw(12, 16, 1, 0, pad=-1)
