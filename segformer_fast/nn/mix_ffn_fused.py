"""Mix-FFN on the fused op (segformer_fast.ops.mix_ffn), with a choice of what autograd keeps.

Linear(C, 4C) -> depthwise 3x3 conv -> GELU -> Linear(4C, C) on (B, N, C) tokens, with the
reference's parameter names (fc1, dwconv, fc2), so state dicts are interchangeable with
:class:`segformer_fast.nn.MixFFN`.

What each memory mode keeps for backward (per token: "save" 5C, "recompute" C, against the
reference's 13C) and the backward itself: see :mod:`segformer_fast.ops.mix_ffn.op`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import validate_backend
from ..configs import LAYER_MEMORY_MODES, MemoryMode
from ..ops.dwconv3x3_gelu import dwconv3x3_gelu
from ..ops.mix_ffn import mix_ffn
from ._autocast import cast, run_autocast

__all__ = ["FusedMixFFN"]


class FusedMixFFN(nn.Module):
    """Mix-FFN using the fused depthwise conv + GELU op, with selectable activation memory.

    Args:
        dim: C, the token width.
        hidden_dim: the hidden width (4C in SegFormer).
        drop: dropout after GELU and after fc2 (0 in SegFormer). While training with drop > 0 the
            module runs the plain autograd composition (fc1 -> op -> dropout -> fc2), which keeps
            the usual activations, since the dropout masks would otherwise need keeping too.
        memory: "save" keeps x and fc1's output (5C per token against the reference's 13C);
            "recompute" keeps only x (C per token) and recomputes fc1 in backward.
        backend: "auto", "torch", "triton", "cpp" or "cuda", for the conv + GELU op.
        approximate: GELU approximation, "none" (erf) or "tanh".

    Shapes: forward(x (B, N, C), hw=(H, W)) -> (B, N, C), N = H * W.

    Example:
        >>> ffn = FusedMixFFN(64, 256, memory="recompute")
        >>> out = ffn(torch.randn(2, 7 * 9, 64), (7, 9))
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        drop: float = 0.0,
        memory: str = "save",
        backend: str = "auto",
        approximate: str = "none",
    ):
        super().__init__()
        MemoryMode.parse(memory, allowed=LAYER_MEMORY_MODES)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.memory = memory
        self.backend = validate_backend(backend, check_available=False)
        self.approximate = approximate

    @classmethod
    def from_reference(cls, module: nn.Module, **kwargs) -> "FusedMixFFN":
        """A FusedMixFFN sharing ``module``'s fc1, dwconv and fc2 (the same Parameter objects).

        ``module`` is a :class:`segformer_fast.nn.MixFFN` (or anything with those three layers and
        an optional ``drop``); ``kwargs`` go to the constructor (memory, backend, approximate).
        """
        drop = module.drop.p if isinstance(getattr(module, "drop", None), nn.Dropout) else 0.0
        kwargs.setdefault("drop", drop)
        new = cls(module.fc1.in_features, module.fc1.out_features, **kwargs)
        new.fc1, new.dwconv, new.fc2 = module.fc1, module.dwconv, module.fc2
        return new

    def extra_repr(self) -> str:
        return f"memory={self.memory!r}, backend={self.backend!r}, approximate={self.approximate!r}"

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) with N = H*W; returns (B, N, C) (in the autocast dtype under autocast)."""
        if x.dim() != 3 or x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"x must be (B, N, {self.fc1.in_features}), got shape {tuple(x.shape)}")
        return run_autocast(self._fused_forward, x, hw)

    def _fused_forward(self, x: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype | None) -> torch.Tensor:
        params = (self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias, self.fc2.weight, self.fc2.bias)
        if self.training and self.drop.p > 0:
            w1, b1, wc, bc, w2, b2 = (cast(p, dtype) for p in params)
            h = F.linear(x, w1, b1)
            y = self.drop(dwconv3x3_gelu(h, hw, wc, bc, self.approximate, self.backend))
            return self.drop(F.linear(y, w2, b2))
        # the op casts fp32 weights to x's dtype itself: autograd keeps the parameters, not 16-bit copies
        return mix_ffn(x, hw, *params, self.approximate, self.backend, save_hidden=self.memory == "save")
