"""Image and mask files: reading (Pillow), atomic PNG writing, class palettes and overlays.

Images are (H, W, 3) uint8 RGB numpy arrays; masks are (H, W) integer arrays of class ids.
"""

from __future__ import annotations

import os

import numpy as np

from ..utils.atomic import atomic_path

__all__ = ["read_image", "read_mask", "write_png", "palette", "colorize", "overlay"]


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise ImportError("reading and writing images needs Pillow: pip install Pillow") from exc
    return Image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grey and RGBA images are converted)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {exc}") from exc


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label PNG as (H, W) class ids: palette ("P") images give their indices, not their colours."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise ValueError(f"mask {os.fspath(path)!r} is a colour ({im.mode}) image; "
                                 "expected single-channel class ids (mode L, P or I)")
            arr = np.asarray(im)
    except OSError as exc:
        raise ValueError(f"cannot read mask {os.fspath(path)!r}: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"mask {os.fspath(path)!r} has shape {arr.shape}; expected (H, W)")
    return arr.astype(np.int64)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write (H, W) ids (uint8, or uint16 when an id exceeds 255) or (H, W, 3) uint8 RGB atomically."""
    Image = _pil()
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr.astype(np.uint8 if arr.max(initial=0) <= 255 else np.uint16)
        if arr.min(initial=0) < 0:
            raise ValueError("label PNGs hold non-negative ids")
    elif arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"write_png takes (H, W) ids or (H, W, 3) RGB, got shape {arr.shape}")
    else:
        arr = arr.astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the bits of id + 1 spread over the high bits of R, G and B.

    No class is black, which marks ignored pixels.
    """
    ids = np.arange(1, num_classes + 1, dtype=np.int64)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 colours; out-of-range ids (the ignore label 255) are black."""
    pal = np.concatenate([palette(num_classes), np.zeros((1, 3), np.uint8)])
    ids = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    return pal[ids]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend (H, W, 3) uint8 colours over an (H, W, 3) uint8 image."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
