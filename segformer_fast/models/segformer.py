"""SegFormer: Mix Transformer (MiT) encoder + All-MLP decoder, built from segformer_fast.nn."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import default_backend, validate_backend
from ..configs import LayerNormEps, SegFormerConfig, get_config
from ..nn import AllMLPDecoder, Block, OverlapPatchEmbed
from ..nn.decode_head_fused import FusedAllMLPDecoder

__all__ = ["MiTStage", "MiTEncoder", "SegFormer", "segformer", "MIN_IMAGE_SIDE"]

MIN_IMAGE_SIDE = 32  # below this, stage 1's 8x8 spatial reduction has no full patch
MEMORY_MODES = ("save", "recompute")


class MiTStage(nn.Module):
    """One MiT stage: overlapped patch embedding, `depth` blocks, LayerNorm, tokens -> NCHW."""

    def __init__(self, cfg: SegFormerConfig, i: int, drop_path: list[float], backend: str | None = None,
                 memory: str = "save"):
        super().__init__()
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
                memory=memory,
            )
            for p in drop_path
        )
        self.norm = nn.LayerNorm(dim, eps=cfg.ln_eps.stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, ceil(H/stride), ceil(W/stride))."""
        x, hw = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, hw)
        x = self.norm(x)  # (B, N, C)
        return x.reshape(x.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2).contiguous()


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


class SegFormer(nn.Module):
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
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
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
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got rank {images.ndim} shape {tuple(images.shape)}")
        if images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels, the model expects {self.config.in_channels} "
                f"(shape {tuple(images.shape)}; channels-first (B, C, H, W) layout)"
            )
        h, w = images.shape[-2:]
        if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
            raise ValueError(f"images must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}, got {h}x{w}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype} (convert and normalise first)")
        param = self.decoder.classifier.weight
        if images.device != param.device:
            raise ValueError(f"images are on {images.device} but the model is on {param.device}")
        if images.dtype != param.dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(
                f"images are {images.dtype} but the model's weights are {param.dtype}; "
                "convert one of them or run under torch.autocast"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.decoder(self.encoder(images))

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """Cross-entropy of logits upsampled (bilinear, align_corners=False) to the labels' size.

        Args:
            logits: (B, K, h, w). labels: (B, H, W) integer class ids; ``ignore_index`` pixels are skipped.
        Returns:
            The mean loss over non-ignored pixels (a scalar).
        """
        if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must be (B, H, W) with B={logits.shape[0]}, got shape {tuple(labels.shape)}")
        if labels.is_floating_point():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, labels.long(), ignore_index=ignore_index)

    def op_backends(self, device: str | torch.device | None = None) -> dict[str, str]:
        """Which implementation each fused op runs with on ``device`` (default: the model's)."""
        from ..backends import resolve_backend
        from ..ops.dwconv3x3_gelu.op import IMPLEMENTED as DWCONV
        from ..ops.sr_attention.op import IMPLEMENTED as ATTN
        from ..ops.upsample_sum.op import IMPLEMENTED as UPSUM

        if self.backend == "torch":
            return {"sr_attention": "reference", "dwconv3x3_gelu": "reference", "upsample_sum": "reference"}
        dev = torch.device(device) if device is not None else self.decoder.classifier.weight.device
        return {name: resolve_backend(self.backend, dev.type, impl)
                for name, impl in (("sr_attention", ATTN), ("dwconv3x3_gelu", DWCONV), ("upsample_sum", UPSUM))}

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
        memory: activation policy of the fused layers: "save" (default) or "recompute" (Mix-FFN
            keeps only its input and recomputes the rest in backward). Ignored by backend "torch".
        **overrides: any SegFormerConfig field, e.g. ``depths=(1, 1, 1, 1)``, ``drop_path_rate=0.0``.
    Returns:
        A SegFormer nn.Module (train mode, as nn.Modules start).

    Example:
        >>> model = segformer("b2", num_classes=19, drop_path_rate=0.0)
    """
    cfg = get_config(variant, num_classes=num_classes, **overrides)
    return SegFormer(cfg, backend=default_backend() if backend is None else backend, memory=memory)
