"""Inference on images of any size: whole-image or sliding-window, multi-scale and flip averaging.

``predict_probs`` is the core: for each scale s the normalised image is resized to s x its size,
segmented whole or in ``window`` x ``window`` tiles at ``stride`` (logits averaged where tiles
overlap, as mmsegmentation's slide inference does), and turned into softmax probabilities at the
original size; the probabilities of every scale (and its horizontal flip) are averaged.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..models.segformer import MIN_IMAGE_SIDE
from .metrics import confusion_matrix, metrics_from_confusion
from .transforms import EvalTransform, rescale_factor

__all__ = ["predict_probs", "window_starts", "load_model", "predict_files", "evaluate_dataset", "evaluate"]


def _logits_full(model, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, K, H, W) logits; images smaller than the model's minimum are padded."""
    h, w = image.shape[-2:]
    ph, pw = max(MIN_IMAGE_SIDE - h, 0), max(MIN_IMAGE_SIDE - w, 0)
    x = F.pad(image, (0, pw, 0, ph)) if ph or pw else image
    logits = model(x)
    if logits.shape[-2:] != x.shape[-2:]:
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :h, :w]


def _logits_sliding(model, image: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, K, H, W): logits of overlapping window x window tiles, averaged."""
    h, w = image.shape[-2:]
    ys = window_starts(h, window, stride)
    xs = window_starts(w, window, stride)
    total = count = None
    for y in ys:
        for x in xs:
            tile = image[..., y : y + window, x : x + window]
            out = _logits_full(model, tile).float()
            if total is None:
                total = out.new_zeros(out.shape[:2] + (h, w))
                count = out.new_zeros((1, 1, h, w))
            total[..., y : y + tile.shape[-2], x : x + tile.shape[-1]] += out
            count[..., y : y + tile.shape[-2], x : x + tile.shape[-1]] += 1
    return total / count


def default_stride(window: int | None) -> int | None:
    """The sliding-window step when none is given: 3/4 of the window (tiles overlap by a quarter)."""
    return max(1, window * 3 // 4) if window else None


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Tile starts covering [0, size): every ``stride``, the last tile flush with the end.

    Example:
        >>> window_starts(100, 40, 30)
        [0, 30, 60]
    """
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride)) + [size - window]
    return sorted(set(starts))


@torch.no_grad()
def predict_probs(model, image: torch.Tensor, scales=(1.0,), flip: bool = False, window: int | None = None,
                  stride: int | None = None) -> torch.Tensor:
    """Class probabilities of normalised images, averaged over scales and flips.

    Args:
        model: a SegFormer, a SETR (or any module mapping (B, 3, h, w) to (B, K, h', w') logits), in eval mode.
        image: (B, 3, H, W) ImageNet-normalised images.
        scales: resize factors to run at (1.0 = as given).
        flip: also run each scale on the horizontally flipped image.
        window, stride: sliding-window size and step in pixels of the scaled image; None for whole-image.
    Returns:
        (B, K, H, W) float32 softmax probabilities.

    Example:
        >>> probs = predict_probs(model.eval(), x, scales=(0.75, 1.0, 1.25), flip=True, window=512, stride=384)
    """
    if window is not None and (stride is None or stride <= 0 or stride > window):
        raise ValueError(f"sliding window needs 0 < stride <= window, got window={window} stride={stride}")
    h, w = image.shape[-2:]
    acc, n = None, 0
    for s in scales:
        size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            logits = _logits_sliding(model, xi, window, stride) if window else _logits_full(model, xi)
            logits = logits.float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            acc = probs if acc is None else acc + probs
            n += 1
    return acc / n


def load_model(weights: str, model: str | None = None, num_classes: int | None = None, backend: str | None = None,
               device: str | torch.device = "cpu", overrides: dict | None = None):
    """A SegFormer or SETR in eval mode from a training output folder, a weights file or a Hugging Face folder.

    Args:
        weights: a ``segformer-fast train`` output folder (its latest checkpoint, which records the
            model), a .safetensors file written by ``save_weights`` or by training (config in its
            metadata), a Hugging Face folder or hub id, or, with ``model``, any file ``load_weights``
            (SegFormer) or ``load_setr_weights`` (SETR) reads.
        model, num_classes: build this model (a name of ``build.MODEL_NAMES``: "b0".."b5",
            "setr-pup", "setr-mla-b16", ...) and load ``weights`` into it.
        overrides: with ``model``, config fields to change (e.g. {"img_size": 768} for a SETR).
    Raises:
        CheckpointMismatchError: the weights do not fit the model.

    Example:
        >>> net = load_model("setr_vit-l_pup_ade.pth", model="setr-pup", num_classes=150)
    """
    from .build import build_model, load_into, load_model_file, load_native, model_from_record
    from .checkpoint import latest_checkpoint, read_checkpoint

    if model is not None:
        if num_classes is None:
            raise ValueError("--model needs --num-classes")
        net = build_model(model, num_classes, backend, overrides=overrides)
        load_into(net, weights)
    elif overrides:
        raise ValueError("model overrides need --model; a checkpoint or weights file with a config describes its model")
    elif os.path.isdir(weights) and latest_checkpoint(weights) is not None:
        state, meta = read_checkpoint(weights)
        if "model" in meta:
            net = model_from_record(meta["model"], backend)
        else:  # written before checkpoints recorded the model: a SegFormer variant
            cfg = meta["config"]
            net = build_model(cfg["model"], cfg["num_classes"], backend)
        load_native(net, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    elif os.path.isdir(weights) and not os.path.exists(os.path.join(weights, "config.json")) and \
            os.path.exists(os.path.join(weights, "model.safetensors")):
        net = load_model_file(os.path.join(weights, "model.safetensors"), backend=backend)
    else:
        net = load_model_file(os.fspath(weights), num_classes=num_classes, backend=backend)
    return net.to(device).eval()


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


OUTPUT_SUFFIXES = ("label", "color", "overlay", "legend")


def keep_ratio_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) an (H, W) image is resized to for a (long, short) test scale, aspect kept (mmseg's
    ``keep_ratio`` Resize, as ``evaluate --scale`` does).

    Example:
        >>> keep_ratio_size((375, 500), (2048, 512))
        (512, 683)
    """
    if len(scale) != 2 or min(scale) <= 0:
        raise ValueError(f"scale must be (long, short) positive sizes, got {tuple(scale)}")
    factor = rescale_factor(tuple(hw), tuple(scale))
    return max(1, int(hw[0] * factor + 0.5)), max(1, int(hw[1] * factor + 0.5))


def predict_files(model, paths, out_dir: str, scales=(1.0,), flip: bool = False, window: int | None = None,
                  stride: int | None = None, *, size: int | None = None, scale: tuple[int, int] | None = None,
                  alpha: float = 0.5, paint_background: bool = True, background="auto", progress: bool = True,
                  overwrite: bool = False) -> list[str]:
    """Segment image files; write four pictures per image into ``out_dir``, atomically.

    ``<stem>_label.png``: the class ids as a palette PNG (``np.array(Image.open(p))`` gives the ids;
    viewers show the colours; 16-bit grey past 256 classes, see :func:`segformer_fast.visualize.save_label_png`);
    ``<stem>_color.png``: the colour map; ``<stem>_overlay.png``: the colours blended over the photo;
    ``<stem>_legend.png``: colour and name of each class present in that image (per image, so a
    150-class model's key lists the handful of classes the image holds). Names come from the model's
    ``config.id2label`` when it has one, else "class k".

    Args:
        model: a SegFormer or SETR (or a patched Hugging Face model) in eval mode, on its device.
        scales, flip, window, stride: as :func:`predict_probs`.
        size: resize each image so its shorter side is ``size`` before inference (aspect kept).
        scale: (long, short): resize each image to fit it, aspect kept, as ``evaluate --scale``.
            With either, the labels come back at the image's own size. Not both.
        alpha: overlay colour weight in [0, 1].
        paint_background: False leaves background pixels of the overlay unpainted.
        background: the class drawn neutral grey: "auto" (:func:`segformer_fast.visualize.background_class`
            of the model's names: a class named background, else 0 without names, none with real
            names), a class id, or None.
        overwrite: replace output files that already exist; without it, any existing one is a
            FileExistsError raised before anything is written.
    Returns the written paths.
    """
    from tqdm import tqdm

    from ..prediction import predict_probs as predict_image
    from ..classes import class_names
    from ..visualize import background_class, colorize, legend, overlay, save_label_png
    from .imageio import read_image, write_png

    if size is not None and scale is not None:
        raise ValueError("give size (the shorter side) or scale (long, short), not both")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    num_classes = model.config.num_classes
    has_names = getattr(getattr(model, "config", None), "id2label", None) is not None
    names = class_names(model, num_classes)
    if background == "auto":
        background = background_class(names if has_names else None)
    elif background is not None and not 0 <= background < num_classes:
        raise ValueError(f"background class {background} is not one of the model's {num_classes} classes")
    pictures = {"background": background, "names": names}
    written = []
    stems = [_stem(p) for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("input images share a file name stem; their outputs would collide")
    targets = [os.path.join(out_dir, f"{stem}_{suffix}.png") for stem in stems for suffix in OUTPUT_SUFFIXES]
    inputs = {os.path.realpath(p) for p in paths}
    clash = [t for t in targets if os.path.realpath(t) in inputs]
    if clash:
        raise ValueError(f"an output would replace an input image: {clash[0]!r}")
    existing = [t for t in targets if os.path.lexists(t)]
    if existing and not overwrite:
        shown = ", ".join(os.path.basename(t) for t in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise FileExistsError(f"{len(existing)} output file(s) already exist in {out_dir!r} ({shown}); "
                              "pass --overwrite (overwrite=True) to replace them, or choose another --out")
    for path, stem in tqdm(list(zip(paths, stems)), desc="predict", disable=not progress):
        image = read_image(path)
        resize = keep_ratio_size(image.shape[:2], scale) if scale is not None else size
        probs = predict_image(model, image, size=resize, window=window, stride=stride, scales=scales, flip=flip,
                              batch_size=1)
        labels = probs.argmax(0).numpy()
        target = os.path.join(out_dir, f"{stem}_label.png")
        save_label_png(target, labels, num_classes, **pictures)
        written.append(target)
        colours = colorize(labels, num_classes, **pictures)
        for suffix, array in (("color", colours),
                              ("overlay", overlay(image, labels, num_classes, alpha, paint_background=paint_background,
                                                  **pictures)),
                              ("legend", legend(labels, num_classes, **pictures))):
            target = os.path.join(out_dir, f"{stem}_{suffix}.png")
            write_png(target, array)
            written.append(target)
    return written


@torch.no_grad()
def evaluate_dataset(model, dataset, scale=None, scales=(1.0,), flip: bool = False, window: int | None = None,
                     stride: int | None = None, device="cpu", indices=None, batch: int = 8,
                     progress: bool = False):
    """Confusion matrix of ``model`` on ``dataset`` items (``indices``, default all), whole-image by default.

    Images are rescaled to ``scale`` ((long, short), aspect kept; None = as stored), predicted, and the
    probabilities resized back to the mask's size. Consecutive same-size images are batched.
    Returns:
        A (K, K) int64 confusion matrix (rows ground truth); see ``metrics_from_confusion``.
    """
    from tqdm import tqdm

    k = model.config.num_classes
    transform = EvalTransform(scale)
    conf = torch.zeros(k, k, dtype=torch.int64)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    pending: list[tuple[torch.Tensor, np.ndarray]] = []

    def flush():
        x = torch.stack([p[0] for p in pending]).to(device)
        probs = predict_probs(model, x, scales, flip, window, stride)
        for (_, mask), p in zip(pending, probs):
            target = torch.from_numpy(mask)
            if p.shape[-2:] != target.shape:
                p = F.interpolate(p[None], size=target.shape, mode="bilinear", align_corners=False)[0]
            conf.add_(confusion_matrix(p.argmax(0).cpu(), target, k, getattr(dataset, "ignore_index", 255)))
        pending.clear()

    for i in tqdm(indices, desc="evaluate", disable=not progress):
        image, mask = dataset[i]
        x = transform(image)
        if pending and (x.shape != pending[0][0].shape or len(pending) >= batch):
            flush()
        pending.append((x, mask))
    if pending:
        flush()
    return conf


def evaluate(model, dataset, class_names=None, **kw):
    """``metrics_from_confusion(evaluate_dataset(model, dataset, **kw))``, per-class IoU named.

    Args:
        class_names: the names to report; default the model's ``config.id2label``, else the
            dataset's ``class_names``, else "class k" (:func:`segformer_fast.classes.model_class_names`).
        **kw: as :func:`evaluate_dataset`.
    Returns:
        A ``SegMetrics`` with "class_names" and "per_class_iou_by_name" besides the numbers.

    Example:
        >>> print(evaluate(model, SyntheticSegmentation("val", 16)).format())
    """
    from ..classes import model_class_names

    names = model_class_names(model, dataset) if class_names is None else class_names
    return metrics_from_confusion(evaluate_dataset(model, dataset, **kw), names)

