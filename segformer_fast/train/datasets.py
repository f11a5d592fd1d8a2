"""Segmentation dataset folders: ADE20K, Cityscapes and a generic images/ + masks/ layout.

Layouts (``root`` is the folder given to ``--data``):
- ``ade``: images/{training,validation}/*.jpg and annotations/{training,validation}/*.png with the
  same stems. ADE20K labels 0 ("other") become ignore (255) and 1..150 become 0..149
  ("reduce_zero_label").
- ``cityscapes``: leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and
  gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png (train ids 0..18, 255 ignored).
- ``generic``: images/ and masks/ holding files with matching stems (masks are PNGs of class ids,
  255 ignored), either flat (every split reads the same files) or with split subfolders
  images/{train,val}/ (also training/validation).

Every sample is checked when read: image and mask sizes must match and every label must be a
class id or the ignore label; a missing mask is found when the folder is listed. Errors are
:class:`DatasetError` and name the file.
"""

from __future__ import annotations

import os

import numpy as np

from ..classes import DATASET_CLASSES
from .imageio import read_image, read_mask

__all__ = ["DatasetError", "SegmentationFolder", "detect_layout", "LAYOUT_DEFAULTS", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# per layout: default classes and the (long, short) scale images are rescaled to (mmseg's configs)
LAYOUT_DEFAULTS = {
    "ade": {"num_classes": 150, "scale": (2048, 512)},
    "cityscapes": {"num_classes": 19, "scale": (2048, 1024)},
    "generic": {"num_classes": None, "scale": None},
}
_SPLITS = {"train": ("train", "training"), "val": ("val", "validation")}


class DatasetError(ValueError):
    """A dataset folder or file is unusable; the message names it."""


def detect_layout(root: str | os.PathLike) -> str:
    """"ade", "cityscapes" or "generic" from the folder's top-level entries."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root!r} does not exist")
    entries = set(os.listdir(root))
    if {"images", "annotations"} <= entries:
        return "ade"
    if {"leftImg8bit", "gtFine"} <= entries:
        return "cityscapes"
    if {"images", "masks"} <= entries:
        return "generic"
    raise DatasetError(
        f"cannot tell the layout of {root!r} (entries: {sorted(entries)[:10]}); expected images/ + annotations/ "
        "(ADE20K), leftImg8bit/ + gtFine/ (Cityscapes) or images/ + masks/ (generic)"
    )


def _files(directory: str, extensions) -> dict[str, str]:
    """{relative path without extension: path} of the files under ``directory`` (recursive)."""
    found = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions and not name.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, stem), directory)
                found[rel] = os.path.join(dirpath, name)
    return found


def _split_dir(parent: str, split: str, required: bool) -> str | None:
    for name in _SPLITS[split]:
        if os.path.isdir(os.path.join(parent, name)):
            return os.path.join(parent, name)
    if required:
        raise DatasetError(f"{parent!r} has no {' or '.join(_SPLITS[split])} folder")
    return None


class SegmentationFolder:
    """A dataset folder in one of the supported layouts.

    Args:
        root: the dataset folder.
        split: "train" or "val".
        layout: "auto" (detected), "ade", "cityscapes" or "generic".
        num_classes: number of classes; defaults to the layout's (150 ADE20K, 19 Cityscapes) and is
            required for "generic".
        ignore_index: the label of pixels to skip.
    Returns (per item): ``(image, mask)``, (H, W, 3) uint8 and (H, W) int64 ids in
        [0, num_classes) or ``ignore_index``.
    ``class_names``: the layout's names in id order (``classes.ADE20K_CLASSES``,
    ``classes.CITYSCAPES_CLASSES``) when ``num_classes`` is the layout's own; otherwise None.

    Example:
        >>> ds = SegmentationFolder("data/ADEChallengeData2016", "val")
        >>> image, mask = ds[0]
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", layout: str = "auto",
                 num_classes: int | None = None, ignore_index: int = 255):
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root = os.fspath(root)
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        if self.layout not in LAYOUT_DEFAULTS:
            raise ValueError(f"layout must be auto, ade, cityscapes or generic, got {layout!r}")
        self.num_classes = num_classes or LAYOUT_DEFAULTS[self.layout]["num_classes"]
        if self.num_classes is None:
            raise DatasetError(f"the generic layout needs the number of classes (--num-classes) for {self.root!r}")
        self.split, self.ignore_index = split, ignore_index
        names = DATASET_CLASSES.get(self.layout)
        self.class_names: tuple[str, ...] | None = names if names and len(names) == self.num_classes else None
        self.scale = LAYOUT_DEFAULTS[self.layout]["scale"]
        self.items = self._pairs()
        if not self.items:
            raise DatasetError(f"no images found for split {split!r} in {self.root!r} ({self.layout} layout)")

    def _pairs(self) -> list[tuple[str, str]]:
        r = self.root
        if self.layout == "ade":
            images = _files(_split_dir(os.path.join(r, "images"), self.split, True), IMAGE_EXTENSIONS)
            masks = _files(_split_dir(os.path.join(r, "annotations"), self.split, True), (".png",))
            key = {k: k for k in images}
        elif self.layout == "cityscapes":
            images = _files(_split_dir(os.path.join(r, "leftImg8bit"), self.split, True), (".png",))
            masks = _files(_split_dir(os.path.join(r, "gtFine"), self.split, True), (".png",))
            images = {k: v for k, v in images.items() if k.endswith("_leftImg8bit")}
            key = {k: k[: -len("_leftImg8bit")] + "_gtFine_labelTrainIds" for k in images}
        else:
            image_dir = _split_dir(os.path.join(r, "images"), self.split, False) or os.path.join(r, "images")
            mask_dir = _split_dir(os.path.join(r, "masks"), self.split, False) or os.path.join(r, "masks")
            images = _files(image_dir, IMAGE_EXTENSIONS)
            masks = _files(mask_dir, (".png",))
            key = {k: k for k in images}
        pairs = []
        for k in sorted(images):
            if key[k] not in masks:
                raise DatasetError(f"image {images[k]!r} has no mask (expected {key[k]}.png in the mask folder)")
            pairs.append((images[k], masks[key[k]]))
        return pairs

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        return os.path.splitext(os.path.basename(self.items[index][0]))[0]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.items[index]
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"mask {mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but image {image_path!r} is "
                               f"{image.shape[1]}x{image.shape[0]} (width x height)")
        if self.layout == "ade":  # reduce_zero_label: 0 -> ignore, k -> k - 1
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
            mask[mask == self.ignore_index - 1] = self.ignore_index
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = np.unique(mask[bad])[:8].tolist()
            raise DatasetError(f"mask {mask_path!r} has label values {values} outside 0..{self.num_classes - 1} "
                               f"(and {self.ignore_index} = ignore)" + (" after reduce_zero_label" if self.layout == "ade" else ""))
        return image, mask
