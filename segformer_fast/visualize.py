"""Pictures of segmentations that people can read: class palettes, colour maps, overlays, legends, label PNGs.

Labels are (H, W) integer arrays of class ids in 0..K-1; ids outside that range (the ignore label
255) are "ignored" pixels. Images and pictures are (H, W, 3) uint8 RGB numpy arrays.

Colours are deterministic: the Cityscapes palette when the 19 class names are Cityscapes', otherwise
a neutral dark grey for the background class (if any) and well-separated colours for the others,
stepping the hue by the golden ratio (each new class lands in one of the largest gaps left between
the hues before it) and cycling saturation and brightness over three levels. Ignored pixels are black.

Example:
    >>> labels = model.predict("photo.jpg").numpy()
    >>> names = segformer_fast.classes.class_names(model)
    >>> picture = overlay(photo, labels, len(names), names=names, paint_background=False)
    >>> key = legend(labels, len(names), names=names)
    >>> save_label_png("photo_label.png", labels, len(names), names=names)
"""

from __future__ import annotations

import colorsys
import os
import re

import numpy as np

from .classes import CITYSCAPES_CLASSES, class_names
from .utils.atomic import atomic_path

__all__ = ["palette", "colorize", "overlay", "legend", "save_label_png", "background_class", "BACKGROUND_COLOUR",
           "IGNORE_COLOUR", "CITYSCAPES_PALETTE"]

BACKGROUND_COLOUR = (64, 64, 64)  # neutral dark grey: the background class
IGNORE_COLOUR = (0, 0, 0)  # ids outside 0..K-1 (the ignore label 255)

CITYSCAPES_PALETTE = np.array(  # the colours of Cityscapes' labels.py, in train-id order
    [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
     (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
     (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)

_BACKGROUND_NAMES = {"background", "unlabeled", "unlabelled", "void"}
_GENERIC_NAME = re.compile(r"^(label|class)\s*\d+$")  # Hugging Face's LABEL_0, or our own "class 0"
_GOLDEN = 0.6180339887498949
_LEVELS = ((0.80, 0.95), (0.95, 0.72), (0.55, 0.88))  # (saturation, value), cycled


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise ImportError("drawing pictures needs Pillow: pip install Pillow") from exc
    return Image, ImageDraw, ImageFont


def _normal(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def background_class(names=None) -> int | None:
    """The class painted neutral grey: the first named background/unlabeled/void, else None when the
    names are real (Cityscapes, ADE20K: every class is something), else 0 (no names: class 0 is
    background by the usual convention, and in the built-in synthetic data)."""
    if not names or all(_GENERIC_NAME.match(_normal(n)) for n in names):
        return 0
    for k, name in enumerate(names):
        if _normal(name) in _BACKGROUND_NAMES:
            return k
    return None


def _is_cityscapes(names) -> bool:
    return names is not None and len(names) == 19 and tuple(_normal(n) for n in names) == CITYSCAPES_CLASSES


def palette(num_classes: int, background: int | None = 0, names=None) -> np.ndarray:
    """(num_classes, 3) uint8 colours, deterministic.

    Args:
        num_classes: K.
        background: the class drawn in neutral dark grey (:data:`BACKGROUND_COLOUR`); None for none.
        names: class names; the 19 Cityscapes names give the Cityscapes colours (``background`` unused).
    Returns:
        (K, 3) uint8: no class is black (black marks ignored pixels) and, up to 256 classes, no two
        classes share a colour.

    Example:
        >>> palette(3)  # grey, then red and blue
        array([[ 64,  64,  64], [242,  48,  48], [  9,  60, 184]], dtype=uint8)
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if background is not None and not 0 <= background < num_classes:
        raise ValueError(f"background class {background} is not one of the {num_classes} classes")
    if _is_cityscapes(names) and num_classes == 19:
        return CITYSCAPES_PALETTE.copy()
    colours = np.empty((num_classes, 3), dtype=np.uint8)
    others = [k for k in range(num_classes) if k != background]
    for j, k in enumerate(others):
        sat, val = _LEVELS[j % len(_LEVELS)]
        rgb = colorsys.hsv_to_rgb((j * _GOLDEN) % 1.0, sat, val)
        colours[k] = np.rint(np.asarray(rgb) * 255)
    if background is not None:
        colours[background] = BACKGROUND_COLOUR
    return colours


def _colours_for(num_classes, background, names, colours) -> np.ndarray:
    if colours is None:
        return palette(num_classes, background, names)
    colours = np.asarray(colours, dtype=np.uint8)
    if colours.shape != (num_classes, 3):
        raise ValueError(f"colours must be ({num_classes}, 3), got shape {colours.shape}")
    return colours


def _labels(labels, what: str = "labels") -> np.ndarray:
    if hasattr(labels, "numpy"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must be an (H, W) integer array of class ids, got {labels.dtype} {labels.shape}")
    return labels


def colorize(labels, num_classes: int, *, background: int | None = 0, names=None, colours=None) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours of :func:`palette`; ids outside 0..K-1 are black.

    ``colours`` (K, 3) replaces the palette.

    Example:
        >>> picture = colorize(labels, 150)
    """
    labels = _labels(labels)
    pal = np.concatenate([_colours_for(num_classes, background, names, colours), np.array([IGNORE_COLOUR], np.uint8)])
    ids = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    return pal[ids]


def overlay(image, labels, num_classes: int, alpha: float = 0.5, *, paint_background: bool = True,
            background: int | None = 0, names=None, colours=None) -> np.ndarray:
    """The class colours blended over a photo: ``(1 - alpha) * image + alpha * colour``, rounded.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) class ids; ignored ids (outside 0..K-1) are never painted.
        alpha: colour weight in [0, 1] (0: the photo, 1: the colour map).
        paint_background: False leaves pixels of the ``background`` class unpainted (the photo shows
            through), so only the objects are tinted.
        background, names, colours: as in :func:`palette` / :func:`colorize`.
    Returns:
        (H, W, 3) uint8.

    Example:
        >>> picture = overlay(photo, labels, 6, alpha=0.6, paint_background=False)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image)
    labels = _labels(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image is {image.shape[:2]} but labels are {labels.shape}")
    colour = colorize(labels, num_classes, background=background, names=names, colours=colours)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    mixed = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    keep = (labels < 0) | (labels >= num_classes)
    if not paint_background and background is not None:
        keep |= labels == background
    mixed[keep] = image[keep]
    return mixed


def _font(size: int):
    _, _, ImageFont = _pil()
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def legend(labels, num_classes: int, names=None, *, background: int | None = 0, colours=None,
           row_height: int = 20) -> np.ndarray:
    """A key to the colours: one row per class present in ``labels``, a swatch and "id name".

    Args:
        labels: an array of class ids of any shape (a label map, or the ids to list); ids outside
            0..K-1 are left out.
        names: class names (default "class k"), e.g. ``segformer_fast.classes.class_names(model)``.
        background, colours: as in :func:`colorize`.
        row_height: pixels per row; the text (Pillow's built-in font) is sized to fit.
    Returns:
        (2 * pad + rows * row_height, W, 3) uint8 on white, pad = row_height // 4, rows the number
        of classes present (one row saying "no classes" when none is), W fitted to the longest name.

    Example:
        >>> key = legend(labels, 6, names=segformer_fast.classes.class_names(model))
    """
    Image, ImageDraw, _ = _pil()
    if row_height < 8:
        raise ValueError(f"row_height must be at least 8, got {row_height}")
    if hasattr(labels, "numpy"):
        labels = labels.detach().cpu().numpy()
    ids = np.unique(np.asarray(labels).astype(np.int64, copy=False))
    ids = [int(k) for k in ids if 0 <= k < num_classes]
    pal = _colours_for(num_classes, background, names, colours)
    names = class_names(names, num_classes)
    rows = [(pal[k], f"{k} {names[k]}") for k in ids] or [(None, "no classes")]
    font = _font(max(8, row_height * 3 // 5))
    pad, swatch = row_height // 4, row_height - 4
    text_x = pad + swatch + row_height // 3
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = text_x + max(draw.textbbox((0, 0), text, font=font)[2] for _, text in rows) + pad
    picture = Image.new("RGB", (width, 2 * pad + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(picture)
    for i, (colour, text) in enumerate(rows):
        top = pad + i * row_height
        if colour is not None:
            draw.rectangle([pad, top + 2, pad + swatch - 1, top + 1 + swatch], fill=tuple(int(c) for c in colour),
                           outline=(128, 128, 128))
        box = draw.textbbox((0, 0), text, font=font)  # no anchor=: Pillow's bitmap font lacks anchors
        draw.text((text_x, top + (row_height - box[3] - box[1]) // 2), text, fill="black", font=font)
    return np.asarray(picture, dtype=np.uint8).copy()


def save_label_png(path: str | os.PathLike, labels, num_classes: int, *, background: int | None = 0, names=None,
                   colours=None) -> None:
    """Write class ids as a PNG whose pixel values are the ids, atomically.

    Up to 256 classes (and ids up to 255, so the ignore label 255 fits): a palette ("P") image,
    shown in the colours of :func:`palette` by any viewer, while ``np.array(Image.open(path))``
    gives the ids back. More classes: 16-bit grey ("I;16"), ids up to 65535, no colours (PNG
    palettes hold 256 entries).

    Example:
        >>> save_label_png("photo_label.png", labels, 150)
        >>> assert (np.array(Image.open("photo_label.png")) == labels).all()
    """
    Image, _, _ = _pil()
    labels = _labels(labels)
    if labels.size and labels.min() < 0:
        raise ValueError(f"label PNGs hold non-negative ids, got {labels.min()}")
    top = int(labels.max(initial=0))
    if num_classes <= 256 and top <= 255:
        picture = Image.frombytes("P", labels.shape[::-1], np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
        pal = np.zeros((256, 3), np.uint8)  # unused entries and the ignore label: black
        pal[:num_classes] = _colours_for(num_classes, background, names, colours)
        picture.putpalette(pal.tobytes())
    elif top <= 65535:
        picture = Image.fromarray(labels.astype(np.uint16))
    else:
        raise ValueError(f"label PNGs hold ids up to 65535, got {top}")
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")
