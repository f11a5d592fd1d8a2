"""Spatial-reduction attention on the fused op (segformer_fast.ops.sr_attention).

A drop-in for :class:`segformer_fast.nn.attention.SpatialReductionAttention`: it subclasses it, so
the parameters (q, k, v, proj, sr, sr_norm) and state dicts are the same; only forward differs.
"""

from __future__ import annotations

import torch

from ..backends import default_backend, validate_backend
from ..ops.sr_attention import sr_attention
from .attention import SpatialReductionAttention
from ._autocast import fp32_under_autocast

__all__ = ["FusedSpatialReductionAttention"]


class FusedSpatialReductionAttention(SpatialReductionAttention):
    """MiT efficient self-attention with the fused, memory-linear op.

    Args:
        dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop, sr_eps: as the reference.
        backend: "auto" (default: ``SEGFORMER_FAST_BACKEND`` or per-device best), "torch",
            "triton" or "cuda"; a per-module attribute, changeable after construction.

    Forward: x (B, N, C), hw = (H, W) -> (B, N, C). In training with ``attn_drop > 0`` the fused op
    (which has no attention-probability dropout) is bypassed and the reference forward runs.

    Example:
        >>> m = FusedSpatialReductionAttention(64, 2, sr_ratio=4)
        >>> y = m(torch.randn(1, 32 * 32, 64), (32, 32))
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_eps: float = 1e-5, backend: str = "auto"):
        super().__init__(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop, sr_eps)
        self.backend = validate_backend(backend, check_available=False)

    @classmethod
    def from_reference(cls, module: SpatialReductionAttention, **kw) -> "FusedSpatialReductionAttention":
        """A fused module sharing ``module``'s Parameter objects (and submodules); kw: e.g. backend."""
        if not isinstance(module, SpatialReductionAttention):
            raise TypeError(f"from_reference needs a SpatialReductionAttention, got {type(module).__name__}")
        eps = module.sr_norm.eps if module.sr_ratio > 1 else 1e-5
        with torch.device("meta"):  # no throwaway allocation; every submodule is replaced below
            fused = cls(module.dim, module.num_heads, module.sr_ratio, qkv_bias=module.q.bias is not None,
                        attn_drop=module.attn_drop, proj_drop=module.proj_drop.p, sr_eps=eps, **kw)
        for name in ("q", "k", "v", "proj", "proj_drop") + (("sr", "sr_norm") if module.sr_ratio > 1 else ()):
            setattr(fused, name, getattr(module, name))
        fused.train(module.training)
        return fused

    @fp32_under_autocast
    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) with N = H*W; returns (B, N, C)."""
        if self.training and self.attn_drop > 0:
            return super().forward(x, hw)  # attention dropout needs the probabilities: reference path
        has_sr = self.sr_ratio > 1
        backend = default_backend() if self.backend == "auto" else self.backend
        if backend == "cpp":  # the environment's default; this op has no C++ CPU kernel, let "auto" pick
            backend = "auto"
        y = sr_attention(
            x, tuple(hw), self.num_heads,
            q_weight=self.q.weight, q_bias=self.q.bias, k_weight=self.k.weight, k_bias=self.k.bias,
            v_weight=self.v.weight, v_bias=self.v.bias, proj_weight=self.proj.weight, proj_bias=self.proj.bias,
            sr=self.sr_ratio,
            sr_weight=self.sr.weight if has_sr else None, sr_bias=self.sr.bias if has_sr else None,
            norm_weight=self.sr_norm.weight if has_sr else None, norm_bias=self.sr_norm.bias if has_sr else None,
            eps=self.sr_norm.eps if has_sr else 1e-5, backend=backend,
        )
        return self.proj_drop(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
