"""Debug helpers shared by the kernels' launchers."""

from __future__ import annotations

import os

import torch

__all__ = ["debug_mode", "empty"]


def debug_mode() -> bool:
    """True when SEGFORMER_FAST_DEBUG=1 (the test suite sets it)."""
    return os.environ.get("SEGFORMER_FAST_DEBUG", "0") == "1"


def empty(*shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``, filled with NaN in debug mode so an element a kernel never wrote fails loudly."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if debug_mode() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
