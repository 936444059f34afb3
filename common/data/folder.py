"""The user's own images: one folder per class, PNG or JPEG, read with Pillow.

Two layouts::

    DIR/train/CLASS/*.png  and  DIR/val/CLASS/*.png     the split as the folders give it
    DIR/CLASS/*.png                                     a seeded split: --val-fraction of each class

Classes are the folder names in sorted order (label 0 is the first). Every image is converted to
the network's channels (Pillow's "L" for 1, "RGB" for 3: alpha is dropped, grey repeated; grey of
16 bits is scaled by its depth to 8 bits first, so white stays white and mid-grey mid-grey) and
stretched to a ``size`` x ``size`` square with Pillow's bilinear filter (antialiased when
shrinking) as it is read; the pipeline then only scales it to [0, 1] (and augments it). Files
with other suffixes and hidden files are left alone; an image Pillow cannot read is an error
that names the file. Pillow is imported only here, when a folder is read.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data.pipeline import DataError, Split
from common.errors import Failed

SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_VAL_FRACTION = 0.1
# The seeded split does not follow --seed: runs with different seeds are judged on the same images.
SPLIT_SEED = 0
MAX_NAMED = 10  # bad files named in one message
MODES = {1: "L", 3: "RGB"}  # Pillow's mode for the network's in_channels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BIT_DEPTH = 24  # byte offset of the bit depth in a PNG's header (IHDR, always the first chunk)


@dataclass(frozen=True)
class FolderData:
    """Both splits of an image folder, its class names and what ``run.json`` records about it."""

    train: Split
    val: Split
    classes: list[str]
    info: dict[str, object] = field(default_factory=dict)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"{root} holds no class folders; expected one folder of images per class (DIR/CLASS/*.png)")
    return classes


def _images(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"class folder {class_dir} holds no images ({', '.join(SUFFIXES)})")
    return files


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise Failed(
            "reading an image folder needs Pillow, which is not installed: pip install 'densenet-suite[cli]'"
        ) from None
    return Image, UnidentifiedImageError


def _full_scale(mode: str, raw: bytes) -> float | None:
    """The sample value of white in a grey image of more than 8 bits (Pillow's modes ``I;16*``,
    ``I`` and ``F``), or None for an 8-bit mode, which Pillow converts correctly itself."""
    if mode.startswith("I;16"):
        return 2.0**16 - 1
    if mode == "I":  # 32-bit integers: how some Pillow versions open a 16-bit PNG; the file says its depth
        bits = raw[PNG_BIT_DEPTH] if raw.startswith(PNG_SIGNATURE) and len(raw) > PNG_BIT_DEPTH else 16
        return 2.0**bits - 1
    if mode == "F":  # floating-point samples have no bit depth: white is 1.0 by convention
        return 1.0
    return None


def _to_8_bit(image, raw: bytes):
    """``image`` with 8-bit samples: a deeper grey image scaled by its bit depth (Pillow's own
    ``convert("L")`` clips it at 255, so a 16-bit image of mean 32768 came out nearly white)."""
    full = _full_scale(image.mode, raw)
    if full is None:
        return image
    Image, _ = _pillow()
    scaled = np.clip(np.asarray(image, np.float64) / full, 0.0, 1.0)
    return Image.fromarray(np.rint(scaled * 255).astype(np.uint8))


def _read(files: list[Path], channels: int, size: int, root: Path) -> tuple[np.ndarray, list[str], int]:
    """uint8 (N, channels, size, size), one ``relative path<TAB>sha256`` line per file, and how
    many images had other channels than ``channels`` (colour read as grey, or grey as colour)."""
    Image, Unidentified = _pillow()
    mode = MODES[channels]
    out = np.empty((len(files), channels, size, size), np.uint8)
    lines, bad, converted = [], [], 0
    for i, path in enumerate(files):
        try:
            raw = path.read_bytes()
            with Image.open(io.BytesIO(raw)) as image:
                converted += len([band for band in image.getbands() if band != "A"]) != channels
                image = _to_8_bit(image, raw).convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, np.uint8)
        except Unidentified:
            bad.append(f"{path} (not an image Pillow recognises)")
            continue
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            bad.append(f"{path} ({type(exc).__name__}: {exc})")
            continue
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        lines.append(f"{path.relative_to(root).as_posix()}\t{hashlib.sha256(raw).hexdigest()}")
    if bad:
        more = f"\n  ... and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise DataError(
            f"{len(bad)} of the {len(files)} images under {root} cannot be read as images:\n  "
            + "\n  ".join(bad[:MAX_NAMED])
            + more
            + "\nremove or repair them"
        )
    return out, lines, converted


def _labelled(class_dirs: list[Path]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        found = _images(d)
        files += found
        labels += [label] * len(found)
    return files, np.array(labels, np.int64)


def load(
    root: str | os.PathLike | None,
    channels: int,
    size: int,
    val_fraction: float | None = None,
) -> FolderData:
    """Read the image folder ``root`` (module docstring) as uint8 (N, channels, size, size) splits."""
    if root is None:
        raise DataError("--dataset folder needs --data-dir: a directory with one folder of images per class")
    root = Path(root)
    if not root.exists():
        raise DataError(f"--data-dir {root} does not exist")
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a directory")
    if channels not in MODES:
        raise DataError(f"image folders feed networks of 1 (grey) or 3 (RGB) channels, not in_channels={channels}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        if val_fraction is not None:
            raise DataError(
                f"{root} has train/ and val/ folders, which are the split; --val-fraction splits a folder of "
                "classes: give one of them"
            )
        train_dirs, val_dirs = _class_dirs(root / "train"), _class_dirs(root / "val")
        names = [d.name for d in train_dirs]
        if names != [d.name for d in val_dirs]:
            only_train = sorted(set(names) - {d.name for d in val_dirs})
            only_val = sorted({d.name for d in val_dirs} - set(names))
            raise DataError(
                f"{root}: train/ and val/ must hold the same class folders; only in train/: "
                f"{', '.join(only_train) or '-'}; only in val/: {', '.join(only_val) or '-'}"
            )
        train_files, train_labels = _labelled(train_dirs)
        val_files, val_labels = _labelled(val_dirs)
        layout = "train/ and val/ folders"
    else:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        class_dirs = _class_dirs(root)
        names = [d.name for d in class_dirs]
        if len(names) < 2:
            raise DataError(f"{root} holds one class folder ({names[0]}); a classifier needs at least two")
        files, labels = _labelled(class_dirs)
        rng = np.random.default_rng(SPLIT_SEED)
        is_val = np.zeros(len(files), bool)
        for label in range(len(names)):
            members = np.flatnonzero(labels == label)
            n_val = min(int(round(fraction * len(members))), len(members) - 1)
            is_val[rng.permutation(members)[:n_val]] = True
        if not is_val.any():
            raise DataError(
                f"{root}: a validation fraction of {fraction} leaves no image to validate on ({len(files)} images); "
                "add images or raise --val-fraction"
            )
        train_files, train_labels = [f for f, v in zip(files, is_val) if not v], labels[~is_val]
        val_files, val_labels = [f for f, v in zip(files, is_val) if v], labels[is_val]
        layout = f"one folder per class, {fraction:g} of each class for validation (seeded split, seed {SPLIT_SEED})"
    if len(names) < 2:
        raise DataError(f"{root} holds one class folder ({names[0]}); a classifier needs at least two")
    images, lines, converted = _read(train_files + val_files, channels, size, root)  # every bad file named at once
    train_images, val_images = images[: len(train_files)], images[len(train_files) :]
    fingerprint = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    info = {
        "dir": str(root.resolve()),
        "layout": layout,
        "classes": names,
        "train_images": len(train_files),
        "val_images": len(val_files),
        "size": size,
        "channels": channels,
        "converted_channels": converted,
        "sha256": fingerprint,
    }
    return FolderData(Split(train_images, train_labels), Split(val_images, val_labels), names, info)
