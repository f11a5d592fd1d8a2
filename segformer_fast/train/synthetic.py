"""A procedurally generated segmentation dataset, so training runs on a fresh machine with no download.

Each image has a smooth, greyish background (class 0) and 3-6 overlapping shapes (ellipses, rotated
rectangles, triangles). A shape's class is its *texture*: horizontal stripes, vertical stripes,
diagonal stripes (either diagonal, so horizontal flips keep the class), a checkerboard or a grid of
dots, drawn with a random period and phase in two colours: one whose hue lies near the class's own
hue (five hues 72 degrees apart, +-15 degrees, random saturation and value) and one random colour.
Pixels of the first colour carry a colour cue that photometric hue jitter blurs; pixels of the
second carry none, so the model must use texture and context to label whole shapes with sharp
boundaries, under pixel noise and 0.5-2x rescaling. A small model learns it in minutes from scratch.

Every sample is a pure function of (seed, split, index).
"""

from __future__ import annotations

import colorsys

import numpy as np

__all__ = ["SyntheticSegmentation", "SYNTHETIC_CLASSES"]

SYNTHETIC_CLASSES = ("background", "h-stripes", "v-stripes", "diagonal", "checker", "dots")
_SPLIT_IDS = {"train": 0, "val": 1}


class SyntheticSegmentation:
    """Random textured shapes on a smooth background.

    Args:
        split: "train" or "val" (disjoint random streams).
        length: number of samples.
        size: (H, W) of every image.
        seed: base seed; sample i is generated from (seed, split, i).
        noise: standard deviation of the per-pixel Gaussian noise (0-255 scale).
    Returns (per item): ``(image, mask)``, (H, W, 3) uint8 and (H, W) int64 in 0..5.

    Example:
        >>> image, mask = SyntheticSegmentation("train", length=10)[3]
    """

    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES
    ignore_index = 255

    def __init__(self, split: str = "train", length: int = 2000, size: tuple[int, int] = (128, 128),
                 seed: int = 0, noise: float = 10.0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
        self.split, self.length, self.size, self.seed, self.noise = split, int(length), tuple(size), int(seed), noise

    def __len__(self) -> int:
        return self.length

    def name(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:06d}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        image = _background(rng, yy, xx, h, w)
        mask = np.zeros((h, w), dtype=np.int64)
        for _ in range(rng.integers(3, 7)):
            cls = int(rng.integers(1, self.num_classes))
            region = _shape(rng, yy, xx, h, w)
            if region.sum() < 16:
                continue
            image[region] = _texture(rng, cls, yy, xx)[region]
            mask[region] = cls
        image += rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _two_colours(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    hue = ((cls - 1) / 5.0 + rng.uniform(-15, 15) / 360.0) % 1.0
    a = 255 * np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)), np.float32)
    while True:
        b = rng.uniform(0, 255, size=3).astype(np.float32)
        if np.abs(a - b).mean() > 60:  # enough contrast that the texture is visible
            return a, b


def _background(rng, yy, xx, h, w) -> np.ndarray:
    # (H, W, 3): two low-saturation colours blended by a slow sinusoid with a random direction and phase
    a, b = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    a, b = (0.3 * c + 0.7 * c.mean() for c in (a, b))
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(0.5, 1.5) * 2 * np.pi / max(h, w)
    t = 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    return a + (b - a) * t[..., None]


def _texture(rng, cls: int, yy, xx) -> np.ndarray:
    a, b = _two_colours(rng, cls)
    period = rng.uniform(6.0, 14.0)
    py, px = rng.uniform(0, period, size=2)
    if cls == 1:
        on = ((yy + py) / period) % 1.0 < 0.5
    elif cls == 2:
        on = ((xx + px) / period) % 1.0 < 0.5
    elif cls == 3:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        on = ((xx + sign * yy + px) / (period * 1.4)) % 1.0 < 0.5
    elif cls == 4:
        on = (np.floor((xx + px) / period) + np.floor((yy + py) / period)) % 2 == 0
    else:
        dx = (xx + px) % period - period / 2
        dy = (yy + py) % period - period / 2
        on = dx * dx + dy * dy < (0.3 * period) ** 2
    return np.where(on[..., None], a, b)


def _shape(rng, yy, xx, h, w) -> np.ndarray:
    """(H, W) bool region of one random shape, 20-60% of the image side across."""
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    r = rng.uniform(0.1, 0.3) * min(h, w)  # half-size
    kind = rng.integers(3)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u = c * (xx - cx) + s * (yy - cy)
    v = -s * (xx - cx) + c * (yy - cy)
    if kind == 0:  # ellipse
        ry = r * rng.uniform(0.5, 1.0)
        return (u / r) ** 2 + (v / ry) ** 2 < 1.0
    if kind == 1:  # rotated rectangle
        ry = r * rng.uniform(0.4, 1.0)
        return (np.abs(u) < r) & (np.abs(v) < ry)
    angles = theta + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, size=3)  # triangle
    pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
    inside = np.ones_like(xx, dtype=bool)
    for i in range(3):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % 3]
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside
