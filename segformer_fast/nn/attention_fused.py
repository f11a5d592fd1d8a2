"""Spatial-reduction attention on the fused op (segformer_fast.ops.sr_attention).

A drop-in for :class:`segformer_fast.nn.attention.SpatialReductionAttention`: it subclasses it, so
the parameters (q, k, v, proj, sr, sr_norm) and state dicts are the same; only forward differs.
"""

from __future__ import annotations

import torch

from ..backends import validate_backend
from ..configs import LAYER_MEMORY_MODES, MemoryMode
from ..ops.sr_attention import sr_attention
from ..ops.sr_attention.op import sr_attention_inference
from .attention import SpatialReductionAttention
from ._autocast import run_autocast

__all__ = ["FusedSpatialReductionAttention"]


class FusedSpatialReductionAttention(SpatialReductionAttention):
    """MiT efficient self-attention with the fused, memory-linear op.

    Args:
        dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop, sr_eps: as the reference.
        backend: "auto" (default: ``SEGFORMER_FAST_BACKEND`` or per-device best), "torch",
            "triton" or "cuda"; a per-module attribute, changeable after construction.
        memory: what training keeps for backward: "save" keeps x, the row log-sum-exp and the
            attention output (2C + h values per token); "recompute" keeps x and the log-sum-exp
            (C + h) and recomputes the attention output in backward (two more (N x M) matmuls per
            head). A per-module attribute, changeable after construction.

    Forward: x (B, N, C), hw = (H, W) -> (B, N, C). In training with ``attn_drop > 0`` the fused op
    (which has no attention-probability dropout) is bypassed and the reference forward runs.

    Example:
        >>> m = FusedSpatialReductionAttention(64, 2, sr_ratio=4)
        >>> y = m(torch.randn(1, 32 * 32, 64), (32, 32))
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_eps: float = 1e-5, backend: str = "auto", memory: str = "save"):
        super().__init__(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop, sr_eps)
        MemoryMode.parse(memory, allowed=LAYER_MEMORY_MODES)
        self.backend = validate_backend(backend, check_available=False)
        self.memory = memory

    @classmethod
    def from_reference(cls, module: SpatialReductionAttention, **kw) -> "FusedSpatialReductionAttention":
        """A fused module sharing ``module``'s Parameter objects (and submodules); kw: backend, memory."""
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

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) with N = H*W; returns (B, N, C) (in the autocast dtype under autocast)."""
        if self.training and self.attn_drop > 0:
            return super().forward(x, hw)  # attention dropout needs the probabilities: reference path
        return run_autocast(self._fused_forward, x, hw)

    def _fused_forward(self, x: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype | None) -> torch.Tensor:
        backend = self.backend  # "auto" reads SEGFORMER_FAST_BACKEND in the resolver, as every op does
        w, eps = self._op_weights()  # fp32 under autocast: the op casts them itself, keeping no 16-bit copies
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference: the weights are this module's own (checked at construction), so only x is
            # checked and no autograd / dispatcher layer is entered
            y = sr_attention_inference(x, hw, self.num_heads, self.sr_ratio, w, eps, backend)
        else:
            y = sr_attention(x, tuple(hw), self.num_heads, sr=self.sr_ratio, eps=eps, backend=backend,
                             save_output=self.memory == "save", **w)
        return self.proj_drop(y) if self.training and self.proj_drop.p > 0 else y

    def _op_weights(self) -> tuple[dict, float]:
        """The op's weight arguments and LayerNorm eps, read per call (submodules may be swapped).

        Reads the submodule and parameter dicts directly: nn.Module attribute lookups cost about a
        microsecond each, which adds up to a few percent of a small stage's attention.
        """
        mods = self._modules
        w = {}
        for name in ("q", "k", "v", "proj") + (("sr", "sr_norm") if self.sr_ratio > 1 else ()):
            params = mods[name]._parameters
            prefix = "norm" if name == "sr_norm" else name  # the op's argument names
            w[prefix + "_weight"], w[prefix + "_bias"] = params["weight"], params.get("bias")
        if self.sr_ratio == 1:
            w.update(sr_weight=None, sr_bias=None, norm_weight=None, norm_bias=None)
            return w, 1e-5
        return w, mods["sr_norm"].eps

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}, memory={self.memory!r}"
