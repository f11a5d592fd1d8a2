"""SegFormer: Mix Transformer (MiT) encoder + All-MLP decoder, built from segformer_fast.nn."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backends import default_backend, validate_backend
from ..configs import MEMORY_MODES  # noqa: F401  (re-exported: its old home)
from ..configs import LayerNormEps, MemoryMode, SegFormerConfig, get_config
from ..nn import AllMLPDecoder, Block, OverlapPatchEmbed
from ..nn.decode_head_fused import FusedAllMLPDecoder
from ..ops.upsample_cross_entropy import upsample_cross_entropy

__all__ = ["MiTStage", "MiTEncoder", "SegFormer", "segformer", "segformer_loss_reference", "MIN_IMAGE_SIDE",
           "check_image_batch"]

MIN_IMAGE_SIDE = 32  # below this, stage 1's 8x8 spatial reduction has no full patch


def _run(fn, *args, checkpointed: bool):
    """fn(*args), under non-reentrant activation checkpointing when ``checkpointed``."""
    if checkpointed:  # keeps the tensor args, saved (visible to saved-tensor hooks) as the region's input
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """Undo any change to ``module``'s buffers (BatchNorm running statistics) made inside the block."""
    kept = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in kept:
                b.copy_(saved)


def check_image_batch(images: torch.Tensor, in_channels: int, min_side: int, param: torch.Tensor) -> None:
    """Raise a clear TypeError/ValueError for an image batch a model cannot segment.

    Args:
        images: the batch to check, expected (B, in_channels, H, W) floats with H, W >= ``min_side``.
        param: one of the model's weights; the images must share its device and (outside autocast) dtype.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got rank {images.ndim} shape {tuple(images.shape)}")
    if images.shape[1] != in_channels:
        raise ValueError(
            f"images have {images.shape[1]} channels, the model expects {in_channels} "
            f"(shape {tuple(images.shape)}; channels-first (B, C, H, W) layout)"
        )
    h, w = images.shape[-2:]
    if h < min_side or w < min_side:
        raise ValueError(f"images must be at least {min_side}x{min_side}, got {h}x{w}")
    if not torch.compiler.is_compiling() and images.shape[0] == 0:  # traced batch sizes stay symbolic
        raise ValueError(f"images hold no image (batch size 0, shape {tuple(images.shape)})")
    if "meta" in (images.device.type, param.device.type):
        what = "images are" if images.device.type == "meta" else "model's weights are"
        raise ValueError(f"the {what} on the meta device, which holds no data: load real weights (e.g. "
                         "model.to_empty(device='cpu') then load_weights) and pass real images")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {images.dtype} (convert and normalise first)")
    if images.device != param.device:
        raise ValueError(f"images are on {images.device} but the model is on {param.device}")
    if images.dtype != param.dtype and not torch.is_autocast_enabled(images.device.type):
        raise TypeError(
            f"images are {images.dtype} but the model's weights are {param.dtype}; "
            "convert one of them or run under torch.autocast"
        )


class MiTStage(nn.Module):
    """One MiT stage: overlapped patch embedding, `depth` blocks, LayerNorm, tokens -> NCHW."""

    def __init__(self, cfg: SegFormerConfig, i: int, drop_path: list[float], backend: str | None = None,
                 memory: str = "save"):
        super().__init__()
        mode = MemoryMode.parse(memory)
        dim = cfg.hidden_sizes[i]
        in_ch = cfg.in_channels if i == 0 else cfg.hidden_sizes[i - 1]
        self.patch_embed = OverlapPatchEmbed(in_ch, dim, cfg.patch_sizes[i], cfg.strides[i], eps=cfg.ln_eps.patch)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.num_heads[i],
                mlp_ratio=cfg.mlp_ratios[i],
                sr_ratio=cfg.sr_ratios[i],
                qkv_bias=cfg.qkv_bias,
                attn_drop=cfg.attn_drop,
                proj_drop=cfg.proj_drop,
                drop_path=p,
                eps=cfg.ln_eps.block,
                sr_eps=cfg.ln_eps.sr,
                backend=backend,
                memory=mode.layer.value,
            )
            for p in drop_path
        )
        self.norm = nn.LayerNorm(dim, eps=cfg.ln_eps.stage)
        self.checkpoint = mode is MemoryMode.CHECKPOINT

    def _finish(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.norm(x)  # (B, N, C)
        return x.reshape(x.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, ceil(H/stride), ceil(W/stride))."""
        ckpt = self.checkpoint and self.training and torch.is_grad_enabled()
        x, hw = _run(self.patch_embed, x, checkpointed=ckpt)
        for block in self.blocks:
            x = _run(block, x, hw, checkpointed=ckpt)
        return _run(self._finish, x, hw, checkpointed=ckpt)


class MiTEncoder(nn.Module):
    """The Mix Transformer encoder: four stages at 1/4, 1/8, 1/16, 1/32 resolution."""

    def __init__(self, cfg: SegFormerConfig, backend: str | None = None, memory: str = "save"):
        super().__init__()
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        starts = [sum(cfg.depths[:i]) for i in range(cfg.num_stages)]
        self.stages = nn.ModuleList(
            MiTStage(cfg, i, rates[starts[i] : starts[i] + cfg.depths[i]], backend, memory) for i in range(cfg.num_stages)
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> four NCHW feature maps, finest first."""
        feats = []
        x = images
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class Predicts:
    """``predict`` / ``predict_probs`` methods for a segmentation model (SegFormer, SETR), delegating to
    :func:`segformer_fast.predict` and :func:`segformer_fast.predict_probs`."""

    def predict(self, images, *, size=None, window=None, stride=None, scales=(1.0,), flip=False, batch_size=8):
        """(H, W) int64 labels of each image (a path, PIL image, (H, W, 3) uint8 array or (3, H, W)
        tensor, or a list of them) at its own size: :func:`segformer_fast.predict` of this model."""
        from ..prediction import predict

        return predict(self, images, size=size, window=window, stride=stride, scales=scales, flip=flip,
                       batch_size=batch_size)

    def predict_probs(self, images, *, size=None, window=None, stride=None, scales=(1.0,), flip=False, batch_size=8):
        """(K, H, W) float32 probabilities of each image: :func:`segformer_fast.predict_probs` of this model."""
        from ..prediction import predict_probs

        return predict_probs(self, images, size=size, window=window, stride=stride, scales=scales, flip=flip,
                             batch_size=batch_size)


class SegFormer(Predicts, nn.Module):
    """SegFormer semantic segmentation model.

    ``model(images)`` maps (B, 3, H, W) images (any H, W >= 32) to logits
    (B, num_classes, ceil(H/4), ceil(W/4)), exactly as Hugging Face's
    SegformerForSemanticSegmentation does. ``model.encoder(images)`` returns the four feature maps,
    ``model.decoder(features)`` the logits.

    Example:
        >>> import torch, segformer_fast
        >>> model = segformer_fast.segformer("b0", num_classes=19).eval()
        >>> model(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 19, 16, 24])
    """

    def __init__(self, config: SegFormerConfig, backend: str = "auto", memory: str = "save"):
        super().__init__()
        memory = MemoryMode.parse(memory).value  # stored as the plain string
        self.config = config
        self.backend = validate_backend(backend)
        self.memory = memory
        # backend "torch" is the pure reference; every other backend uses the fused layers, whose
        # ops pick their implementation per call (see segformer_fast.backends).
        fused = {} if self.backend == "torch" else {"backend": self.backend}
        self.encoder = MiTEncoder(config, fused.get("backend"), memory)
        self.decoder = (FusedAllMLPDecoder if fused else AllMLPDecoder)(
            config.hidden_sizes,
            config.decoder_dim,
            config.num_classes,
            dropout=config.decoder_dropout,
            dropout2d=config.decoder_dropout2d,
            **fused,
        )
        self.apply(_init_weights)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error for input the model cannot segment."""
        check_image_batch(images, self.config.in_channels, MIN_IMAGE_SIDE, self.decoder.classifier.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        feats = self.encoder(images)
        if not (self.memory == "checkpoint" and self.training and torch.is_grad_enabled()):
            return self.decoder(feats)
        reruns = 0

        def decode(*features):
            nonlocal reruns
            reruns += 1
            if reruns == 1:
                return self.decoder(list(features))
            with _buffers_kept(self.decoder):  # the rerun in backward must not count the batch twice
                return self.decoder(list(features))

        return _run(decode, *feats, checkpointed=True)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of logits upsampled (bilinear, align_corners=False) to the labels' size.

        Backend "torch" computes it literally (:func:`segformer_loss_reference`: F.interpolate +
        F.cross_entropy); every other backend uses the fused segformer_fast.ops.upsample_cross_entropy,
        which never stores the full-resolution logits.

        Args:
            logits: (B, K, h, w). labels: (B, H, W) integer class ids; ``ignore_index`` pixels are skipped.
            weight: optional (K,) class weights (weighted mean, as F.cross_entropy).
        Returns:
            The mean loss over non-ignored pixels (a scalar).
        """
        if self.backend == "torch":
            return segformer_loss_reference(logits, labels, ignore_index, weight)
        _check_labels(logits, labels)
        return upsample_cross_entropy(logits, labels, ignore_index, weight, backend=self.backend)

    def op_backends(self, device: str | torch.device | None = None) -> dict[str, str]:
        """Which implementation each fused op runs with on ``device`` (default: the model's)."""
        from ..dispatch import resolve_ops

        ops = ("sr_attention", "dwconv3x3_gelu", "upsample_sum")
        if self.backend == "torch":
            return dict.fromkeys(ops, "reference")
        w = self.decoder.classifier.weight
        return resolve_ops(dict.fromkeys(ops, self.backend), w.new_empty(0, device=device if device is not None else w.device))

    def set_layer_norm_eps(self, eps: LayerNormEps) -> None:
        """Set every LayerNorm's epsilon by role (weights loaded from another convention need this)."""
        for stage in self.encoder.stages:
            stage.patch_embed.norm.eps = eps.patch
            stage.norm.eps = eps.stage
            for block in stage.blocks:
                block.norm1.eps = block.norm2.eps = eps.block
                if hasattr(block.attn, "sr_norm"):
                    block.attn.sr_norm.eps = eps.sr
        self.config = self.config.replace(ln_eps=eps)

    def extra_repr(self) -> str:
        return (f"variant={self.config.name}, num_classes={self.config.num_classes}, backend={self.backend!r}, "
                f"memory={self.memory!r}")


def segformer_loss_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                             weight: torch.Tensor | None = None) -> torch.Tensor:
    """SegFormer's loss, literally: logits upsampled (bilinear, align_corners=False) to the labels'
    size, then F.cross_entropy. The oracle for :meth:`SegFormer.loss` on the fused backends.

    Args:
        logits: (B, K, h, w). labels: (B, H, W) integer class ids; ``ignore_index`` pixels are skipped.
        weight: optional (K,) class weights (weighted mean, as F.cross_entropy).
    Returns:
        The mean loss over non-ignored pixels (a scalar).

    Example:
        >>> loss = segformer_loss_reference(torch.randn(2, 19, 16, 16), torch.randint(0, 19, (2, 64, 64)))
    """
    _check_labels(logits, labels)
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels.long(), weight=weight, ignore_index=ignore_index)


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B, H, W) with B={logits.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def _init_weights(m: nn.Module) -> None:
    # The NVlabs initialisation: truncated normal for Linear, He (fan-out) normal for convs.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def segformer(variant: str | SegFormerConfig = "b0", num_classes: int = 150, backend: str | None = None,
              memory: str = "save", **overrides) -> SegFormer:
    """Build a SegFormer with random weights.

    Args:
        variant: "b0".."b5" or a SegFormerConfig.
        num_classes: classifier outputs (150 for ADE20K, 19 for Cityscapes).
        backend: "auto" (default, or SEGFORMER_FAST_BACKEND), "torch" (pure reference), "triton",
            "cuda" or "cpp". A backend that is not available raises.
        memory: what training keeps for backward: "save" (default), "recompute" (the fused Mix-FFN
            keeps only its input, the fused attention its input and log-sum-exp, and each recomputes
            the rest in backward; no effect with backend "torch") or "checkpoint" ("recompute" plus
            activation checkpointing of each block, patch embedding, stage norm and the decoder, while
            training with grad enabled; gradients as with "save").
        **overrides: any SegFormerConfig field, e.g. ``depths=(1, 1, 1, 1)``, ``drop_path_rate=0.0``.
    Returns:
        A SegFormer nn.Module (train mode, as nn.Modules start).

    Example:
        >>> model = segformer("b2", num_classes=19, drop_path_rate=0.0)
    """
    cfg = get_config(variant, num_classes=num_classes, **overrides)
    return SegFormer(cfg, backend=default_backend() if backend is None else backend, memory=memory)
