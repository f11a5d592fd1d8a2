"""Image and mask files: reading (Pillow) and atomic PNG writing.

Images are (H, W, 3) uint8 RGB numpy arrays; masks are (H, W) integer arrays of class ids. The
pictures of labels (palettes, colour maps, overlays, legends, palette label PNGs) live in
:mod:`segformer_fast.visualize`; ``palette``, ``colorize``, ``overlay`` and ``save_label_png`` are
importable from here too.
"""

from __future__ import annotations

import os

import numpy as np

from ..utils.atomic import atomic_path
from ..visualize import colorize, overlay, palette, save_label_png

__all__ = ["read_image", "read_mask", "write_png", "save_label_png", "palette", "colorize", "overlay"]


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise ImportError("reading and writing images needs Pillow: pip install Pillow") from exc
    return Image


def _grey_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit and 32-bit integer grey ("I;16*", "I") by 1/257 (0..65535 -> 0..255); float ("F") by its
    range: [0, 1] times 255, [0, 255] as is, else min..max to 0..255. Rounded, never clipped at 255."""
    a = arr.astype(np.float64)
    if mode != "F":
        a = a / 257.0 if a.max(initial=0) <= 65535 else (a - a.min()) * (255.0 / max(np.ptp(a), 1))
    else:
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = a.min(initial=0.0), a.max(initial=0.0)
        if lo < 0 or hi > 255:
            a = (a - lo) * (255.0 / max(hi - lo, np.finfo(np.float64).tiny))
        elif hi <= 1:
            a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grey and RGBA images are converted; 16-bit and float
    grey images are scaled to 0..255, see :func:`_grey_to_uint8`, not clipped)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":  # convert("RGB") would clip them at 255
                grey = _grey_to_uint8(np.asarray(im), im.mode)
                return np.repeat(grey[..., None], 3, axis=2)
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
    """Write (H, W) ids (grey "L", or 16-bit "I;16" when an id exceeds 255) or (H, W, 3) uint8 RGB atomically.

    Predicted label maps use :func:`save_label_png` instead: the same ids, with the colours attached.
    """
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
