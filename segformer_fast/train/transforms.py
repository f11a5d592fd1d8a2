"""Training and evaluation transforms, as in the SegFormer paper (mmsegmentation's pipeline).

Train: random rescale (ratio 0.5-2.0 of a base scale, aspect kept) -> random crop (optionally
rejecting crops where one class covers more than ``cat_max_ratio``) -> horizontal flip ->
photometric distortion (brightness, contrast, saturation, hue) -> ImageNet normalisation -> pad
to the crop size (image 0, labels ``ignore_index``).

All randomness comes from the ``numpy.random.Generator`` passed in, so a sample is a pure function
of (image, mask, generator seed): the trainer derives the seed from (run seed, step, slot), which
makes data order and augmentation part of the checkpointed state at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TrainTransform", "EvalTransform", "normalize", "rescale_factor"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0-255 RGB
IMAGENET_STD = (58.395, 57.12, 57.375)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) float 0-255 RGB -> ImageNet-normalised."""
    shape = (3, 1, 1) if image.ndim == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(shape)
    return (image - mean) / std


def rescale_factor(hw: tuple[int, int], scale: tuple[int, int] | None, ratio: float = 1.0) -> float:
    """Resize factor that fits an (H, W) image into ``scale`` = (long, short) * ratio, aspect kept.

    With ``scale`` None the factor is ``ratio`` itself (scales are relative to the image).
    """
    if scale is None:
        return ratio
    long_side, short_side = max(scale) * ratio, min(scale) * ratio
    return min(long_side / max(hw), short_side / min(hw))


def _resize(image: torch.Tensor, mask: torch.Tensor | None, factor: float):
    # image (3, H, W) float; mask (H, W) int64 -> resized (bilinear / nearest)
    h, w = image.shape[-2:]
    size = (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5)))
    if size == (h, w):
        return image, mask
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


@dataclass
class TrainTransform:
    """Augment one (image, mask) pair for training.

    Args:
        crop: (h, w) output size.
        scale: base (long, short) scale the ratio multiplies, e.g. (2048, 512) for ADE20K; None to
            scale relative to the image itself.
        ratio_range: random rescale ratio range.
        cat_max_ratio: reject crops where one class covers more than this fraction of the labelled
            pixels (up to 10 tries); 1.0 disables.
        flip_prob: horizontal flip probability.
        photometric: apply brightness/contrast/saturation/hue jitter.
        ignore_index: label of padded and ignored pixels.
    Call: ``transform(image (H, W, 3) uint8, mask (H, W) int, rng)`` ->
        ``(image (3, h, w) float32 normalised, mask (h, w) int64)``.
    """

    crop: tuple[int, int] = (512, 512)
    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # (3, H, W) 0-255
        lab = torch.from_numpy(np.ascontiguousarray(mask)).long()
        ratio = rng.uniform(*self.ratio_range)
        img, lab = _resize(img, lab, rescale_factor(tuple(img.shape[-2:]), self.scale, ratio))
        img, lab = self._random_crop(img, lab, rng)
        if rng.random() < self.flip_prob:
            img, lab = img.flip(-1), lab.flip(-1)
        if self.photometric:
            img = photometric_distortion(img, rng)
        img = normalize(img)
        return self._pad(img, lab)

    def _random_crop(self, img, lab, rng):
        ch, cw = self.crop
        h, w = lab.shape
        for _ in range(10):
            y = int(rng.integers(0, max(h - ch, 0) + 1))
            x = int(rng.integers(0, max(w - cw, 0) + 1))
            crop = lab[y : y + ch, x : x + cw]
            if self.cat_max_ratio >= 1.0:
                break
            counts = torch.bincount(crop[crop != self.ignore_index].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return img[:, y : y + ch, x : x + cw], lab[y : y + ch, x : x + cw]

    def _pad(self, img, lab):
        ch, cw = self.crop
        ph, pw = ch - img.shape[-2], cw - img.shape[-1]
        if ph > 0 or pw > 0:
            img = F.pad(img, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            lab = F.pad(lab, (0, max(pw, 0), 0, max(ph, 0)), value=self.ignore_index)
        return img.contiguous(), lab.contiguous()


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(3, H, W) float 0-255 RGB -> jittered, each part with probability 1/2.

    Brightness +-32, contrast x[0.5, 1.5] (before or after the colour jitter, at random),
    saturation x[0.5, 1.5] (blend with the grey image), hue +-36 degrees (rotation about the grey
    axis in YIQ space). Clamped to [0, 255].
    """
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    alpha = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and alpha is not None:
        img = img * alpha
    img = img.clamp(0, 255)
    if rng.random() < 0.5:
        grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        img = (grey + rng.uniform(0.5, 1.5) * (img - grey)).clamp(0, 255)
    if rng.random() < 0.5:
        img = _rotate_hue(img, np.deg2rad(rng.uniform(-36, 36))).clamp(0, 255)
    if not contrast_first and alpha is not None:
        img = (img * alpha).clamp(0, 255)
    return img


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(img: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = float(np.cos(angle)), float(np.sin(angle))
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = torch.linalg.inv(_RGB2YIQ) @ rot @ _RGB2YIQ  # (3, 3) acting on RGB
    return torch.einsum("ij,jhw->ihw", m.to(img.dtype), img)


@dataclass
class EvalTransform:
    """Whole-image evaluation input: optional rescale to ``scale`` (aspect kept), normalisation.

    Call: ``transform(image (H, W, 3) uint8)`` -> (3, h, w) float32 normalised; labels stay at the
    original size and predictions are resized back to it.
    """

    scale: tuple[int, int] | None = None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        img, _ = _resize(img, None, rescale_factor(tuple(img.shape[-2:]), self.scale))
        return normalize(img)
