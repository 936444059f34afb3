"""Input validation shared by the four backends: plain shape/dtype arithmetic, no framework."""

from __future__ import annotations

from common.errors import InputError


def _known(size: object) -> int | None:
    """A size as an int, or None where it is unknown (a traced graph's ``None``) or symbolic (a
    ``jax.export`` batch dimension, whose ``int()`` raises a plain Exception); neither is checked."""
    if size is None:
        return None
    try:
        return int(size)  # type: ignore[call-overload]
    except Exception:
        return None


def check_images(
    shape: tuple[int | None, ...],
    is_float: bool,
    dtype: str,
    *,
    layout: str,
    in_channels: int | None,
    min_size: int,
    what: str = "DenseNet",
) -> None:
    """Raise :class:`InputError` unless ``shape`` is a float image batch the network can take.

    ``layout`` is ``"NCHW"`` or ``"NHWC"``; ``in_channels`` is None while a lazy network has not
    yet seen its first batch (any channel count is then accepted).
    """
    shape = tuple(_known(d) for d in shape)
    expected = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    if len(shape) != 4:
        raise InputError(
            f"{what} expects a rank-4 {layout} batch {expected}, got rank {len(shape)} shape "
            f"{shape}" + (" (add a batch axis)" if len(shape) == 3 else "")
        )
    if not is_float:
        raise InputError(f"{what} expects floating-point images (float32), got dtype {dtype}")
    if layout == "NCHW":
        n, c, h, w = shape
    else:
        n, h, w, c = shape
    if n is not None and n < 1:
        raise InputError(f"{what} got an empty batch: shape {shape}")
    if in_channels is not None and c is not None and c != in_channels:
        raise InputError(
            f"{what} was built for {in_channels}-channel images, got {c} channels ({layout} shape {shape})"
        )
    if (h is not None and h < min_size) or (w is not None and w < min_size):
        raise InputError(
            f"{what} needs images of at least {min_size}x{min_size}, got {h}x{w}; "
            "resize the input, e.g. Fashion-MNIST's 28x28 to 96x96"
        )
