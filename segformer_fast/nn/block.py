from __future__ import annotations

import torch
from torch import nn

from .attention import SpatialReductionAttention
from .mix_ffn import MixFFN


class DropPath(nn.Module):
    """Stochastic depth per sample: zero the residual branch of a whole sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm MiT block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: int = 4,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        sr_eps: float = 1e-5,
        backend: str | None = None,
        memory: str = "save",
    ):
        """``backend=None`` builds the pure-PyTorch reference layers; any backend name builds the
        fused layers, whose ops resolve that backend per call. ``memory`` ("save" or "recompute")
        is the fused attention's and Mix-FFN's activation policy."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        if backend is None:
            self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop, sr_eps)
        else:
            from .attention_fused import FusedSpatialReductionAttention

            self.attn = FusedSpatialReductionAttention(
                dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop, sr_eps, backend=backend, memory=memory
            )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        if backend is None:
            self.mlp = MixFFN(dim, dim * mlp_ratio, proj_drop)
        else:
            from .mix_ffn_fused import FusedMixFFN

            self.mlp = FusedMixFFN(dim, dim * mlp_ratio, proj_drop, memory=memory, backend=backend)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))
