"""ONNX export with dynamic height and width.

For a segformer_fast model the exported graph is the reference function of the same weights (a
reference-backend twin loaded with its state dict). A (patched) Hugging Face model is exported as it
is: the fused custom ops go through their ONNX translations (:mod:`segformer_fast.ops.onnx`), which
write each op's reference math in ONNX operators. The graph takes
``images`` (B, 3, H, W) and returns ``logits`` (B, K, ceil(H/4), ceil(W/4)); a SETR's graph returns
(B, K, H, W) for H, W in multiples of 16.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch
from torch import nn

from ..utils.atomic import atomic_path

__all__ = ["export_onnx", "verify_onnx"]


class _LogitsOnly(nn.Module):
    """A Hugging Face Segformer whose forward takes images and returns only the logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=images).logits


def _exportable(model: nn.Module) -> nn.Module:
    from ..models.segformer import SegFormer
    from ..models.setr import SETR

    if isinstance(model, SETR):
        twin = SETR(model.config, backend="torch", aux=model.aux)
        twin.load_state_dict(model.state_dict())
        return twin.to(next(model.parameters()).device)
    if isinstance(model, SegFormer):
        twin = SegFormer(model.config, backend="torch")
        twin.load_state_dict(model.state_dict())
        return twin.to(next(model.parameters()).device)
    if type(model).__name__.startswith("Segformer") and hasattr(model, "decode_head"):
        return _LogitsOnly(model)  # patched or not: the fused ops have ONNX translations
    raise TypeError(f"export_onnx supports segformer_fast.SegFormer, segformer_fast.SETR and transformers "
                    f"SegformerForSemanticSegmentation; got {type(model).__name__}")


@contextlib.contextmanager
def _eval_mode(net: nn.Module):
    """``net`` in eval mode inside the block, each submodule's own mode restored after: a Hugging Face
    model is exported or run itself, not a copy."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _exporter_quiet():
    """Silence what torch's exporter says about itself, not about the model: torchvision ops it skips
    registering (log warnings) and its own deprecation warnings."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, path: str | os.PathLike, dynamic_hw: bool = True,
                example_size: tuple[int, int] = (512, 512), batch: int = 2, dynamic_batch: bool = True) -> str:
    """Export a SegFormer or SETR to ONNX, written atomically.

    Args:
        model: a ``segformer_fast.SegFormer`` (any backend, patched or not), a (patched)
            transformers ``SegformerForSemanticSegmentation``, or a ``segformer_fast.SETR`` (its
            eval function: (B, K, H, W) logits). The model itself is not modified.
        path: output ``.onnx`` file.
        dynamic_hw: make height and width dynamic (SegFormer: any size >= 32; SETR: multiples of
            16, pad the image first); else fixed to ``example_size``.
        example_size: (H, W) of the tracing input.
        batch, dynamic_batch: the tracing batch (2: a batch of 1 would be specialised), and whether
            the batch dimension is dynamic.
    Returns:
        The path written.

    Example:
        >>> segformer_fast.export_onnx(model, "segformer.onnx")
        >>> import onnxruntime; sess = onnxruntime.InferenceSession("segformer.onnx")
    """
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as exc:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install onnx onnxscript") from exc
    from ..models.setr import SETR

    path = os.fspath(path)
    net = _exportable(model)
    device = next(net.parameters()).device
    x = torch.randn(batch, 3, *example_size, device=device)
    shapes = {}
    if dynamic_batch:
        shapes[0] = torch.export.Dim("batch", min=1, max=1024)
    if dynamic_hw and isinstance(net, SETR):
        # SETR pads to multiples of its patch size and crops back; that size arithmetic does not survive
        # in a graph with free H and W, so the graph takes H, W in multiples of the patch size
        p = net.config.patch_size
        if example_size[0] % p or example_size[1] % p:
            raise ValueError(f"export_onnx: a SETR graph takes H, W in multiples of {p}; example_size={example_size}")
        shapes[2] = p * torch.export.Dim("height_patches", min=2, max=16384 // p)
        shapes[3] = p * torch.export.Dim("width_patches", min=2, max=16384 // p)
    elif dynamic_hw:
        shapes[2] = torch.export.Dim("height", min=32, max=16384)
        shapes[3] = torch.export.Dim("width", min=32, max=16384)
    from ..ops.onnx import onnx_translations

    with _eval_mode(net), atomic_path(path, ".onnx") as tmp, torch.no_grad(), _exporter_quiet():
        torch.onnx.export(net, (x,), tmp, dynamo=True, external_data=False, input_names=["images"],
                          output_names=["logits"], dynamic_shapes=(shapes,) if shapes else None,
                          custom_translation_table=onnx_translations(), verbose=False)
    return path


def verify_onnx(model: nn.Module, path: str | os.PathLike, size: tuple[int, int] = (512, 512), seed: int = 0) -> float:
    """Largest absolute difference between the logits of ``model`` and of the ONNX graph at ``path``
    (onnxruntime, CPU) on one random (1, 3, H, W) image.

    Example:
        >>> export_onnx(model, "m.onnx"); print(verify_onnx(model, "m.onnx", (512, 512)))
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("verifying an ONNX graph needs onnxruntime: pip install onnxruntime") from exc
    net = _exportable(model)
    device = next(net.parameters()).device
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    with _eval_mode(net), torch.no_grad():
        want = net(x.to(device)).float().cpu()
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if got.shape != want.shape:
        raise ValueError(f"the ONNX graph returned logits of shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}")
    return float((got - want).abs().max())
