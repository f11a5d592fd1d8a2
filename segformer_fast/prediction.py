"""One-call prediction: images in any common form -> class labels (or probabilities) at their own size.

``predict(model, images)`` reads each image (a path, a PIL image, an (H, W, 3) uint8 array or a
(3, H, W) tensor), optionally resizes it, normalises it, runs
:func:`segformer_fast.train.inference.predict_probs` (whole-image or sliding-window, multi-scale,
flip) on same-size groups of up to ``batch_size`` images, resizes the probabilities back to the
image's size and takes the argmax. The model runs under ``torch.no_grad`` in eval mode (every
module's mode is restored afterwards) on its own device and dtype. Works for SegFormer, SETR and
patched (or plain) Hugging Face ``SegformerForSemanticSegmentation`` models, whose outputs'
``.logits`` are used.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["predict", "predict_probs"]

_KINDS = "a path (str or pathlib.Path), a PIL image, an (H, W, 3) uint8 numpy array or a (3, H, W) tensor"


def _as_chw(image, index: int) -> torch.Tensor:
    """One input image -> (3, H, W) float32 RGB in 0..255 on the CPU (or the tensor's device)."""
    from .train.imageio import _grey_to_uint8, read_image

    what = f"image {index}"
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{what}: no such image file {os.fspath(image)!r}")
        image = read_image(image)
    elif type(image).__module__.startswith("PIL."):
        if image.mode.startswith("I") or image.mode == "F":  # convert("RGB") would clip them at 255
            image = np.repeat(_grey_to_uint8(np.asarray(image), image.mode)[..., None], 3, axis=2)
        else:
            image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what}: a numpy image must be (H, W, 3) RGB, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise TypeError(f"{what}: a numpy image must be uint8 (0..255), got dtype {image.dtype}")
        if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays (PIL's, for one)
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{what}: a tensor image must be (3, H, W) RGB, channels first, "
                             f"got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float()
        if not image.is_floating_point():
            raise TypeError(f"{what}: a tensor image must be uint8 (0..255) or float in [0, 1], got {image.dtype}")
        lo, hi = image.min().item(), image.max().item()
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise ValueError(f"{what}: a float tensor image must hold values in [0, 1], got [{lo}, {hi}] "
                             "(pass uint8 for 0..255)")
        return image.float() * 255.0
    raise TypeError(f"{what}: expected {_KINDS}, got {type(image).__name__}")


def _resized(image: torch.Tensor, size) -> torch.Tensor:
    """(3, H, W) -> resized: ``size`` an int is the shorter side (aspect kept), (h, w) the exact size."""
    from .train.transforms import _resize

    if size is None:
        return image
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return _resize(image, None, size / min(image.shape[-2:]))[0]
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    if (h, w) == tuple(image.shape[-2:]):
        return image
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]


class _Logits(torch.nn.Module):
    """Calls a model whose output is not a tensor (Hugging Face's ``SemanticSegmenterOutput``) for its logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "logits"):
            return out.logits
        return out[0]


def _model_place(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def predict_probs(model, images, *, size=None, window: int | None = None, stride: int | None = None,
                  scales=(1.0,), flip: bool = False, batch_size: int = 8):
    """Class probabilities of images, each at its own size.

    Args:
        model: a SegFormer, a SETR, or a (patched) Hugging Face SegformerForSemanticSegmentation.
        images: one image or a list of images, each a path (str or pathlib.Path), a PIL image, an
            (H, W, 3) uint8 numpy array, or a (3, H, W) RGB tensor: uint8 in 0..255 or float in [0, 1].
        size: resize before inference: an int is the shorter side (aspect kept), (h, w) an exact
            size; None runs at the image's size. Probabilities come back at the original size.
        window, stride: sliding-window inference in window x window tiles every ``stride`` pixels
            (default 3/4 of the window); None for whole-image.
        scales, flip: multi-scale and horizontal-flip averaging, as
            :func:`segformer_fast.train.inference.predict_probs`.
        batch_size: the most images per forward; images of one (resized) size are batched together.
    Returns:
        (K, H, W) float32 probabilities on the CPU for one image; a list of them for a list.

    Example:
        >>> probs = segformer_fast.predict_probs(model, "photo.jpg", size=512)
    """
    from .train.inference import default_stride
    from .train.inference import predict_probs as _probs
    from .train.transforms import normalize

    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if stride is None:
        stride = default_stride(window)
    chw = [_as_chw(im, i) for i, im in enumerate(items)]  # all read and checked before any forward
    device, dtype = _model_place(model)
    net = model if _returns_tensor(model) else _Logits(model)
    modes = [(m, m.training) for m in model.modules()]
    results: list[torch.Tensor | None] = [None] * len(items)
    groups: dict[tuple[int, int], list[int]] = {}
    prepared = [_resized(x, size) for x in chw]
    for i, x in enumerate(prepared):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    model.eval()
    try:
        with torch.no_grad():
            for idx in groups.values():
                for start in range(0, len(idx), batch_size):
                    chunk = idx[start : start + batch_size]
                    x = normalize(torch.stack([prepared[i].to(device) for i in chunk])).to(dtype=dtype)
                    probs = _probs(net, x, scales, flip, window, stride)
                    for i, p in zip(chunk, probs):
                        hw = tuple(chw[i].shape[-2:])
                        if tuple(p.shape[-2:]) != hw:
                            p = F.interpolate(p[None], size=hw, mode="bilinear", align_corners=False)[0]
                        results[i] = p.cpu()
    finally:
        for m, training in modes:
            m.training = training
    return results[0] if single else results


def predict(model, images, *, size=None, window: int | None = None, stride: int | None = None,
            scales=(1.0,), flip: bool = False, batch_size: int = 8):
    """Class labels of images, each at its own size: the argmax of :func:`predict_probs` (same arguments).

    Returns:
        (H, W) int64 labels on the CPU for one image; a list of them for a list.

    Example:
        >>> labels = segformer_fast.predict(model, "photo.jpg")
        >>> labels = model.predict(["a.png", "b.png"], window=512, flip=True)
    """
    probs = predict_probs(model, images, size=size, window=window, stride=stride, scales=scales, flip=flip,
                          batch_size=batch_size)
    if isinstance(probs, torch.Tensor):
        return probs.argmax(0)
    return [p.argmax(0) for p in probs]


def _returns_tensor(model) -> bool:
    from .models.segformer import SegFormer
    from .models.setr import SETR

    return isinstance(model, (SegFormer, SETR))

