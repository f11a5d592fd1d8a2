"""Autocast for the tools and benchmarks: one name per choice ("none", "bf16", "fp16") and a context
that fails loudly where the device's autocast would silently switch itself off for that dtype."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["AMP_CHOICES", "amp_dtype", "amp_name", "autocast"]

AMP_CHOICES: tuple[str, ...] = ("none", "bf16", "fp16")  # argparse choices; no torch import for --help


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype named by ``amp`` ("bf16", "fp16"; None or "none": no autocast)."""
    import torch

    key = "none" if amp is None else amp
    if key not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES} or None, got {amp!r}")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[key]


def amp_name(amp: str | None) -> str:
    """How reports name the choice: "fp32 (no autocast)", "autocast bf16", "autocast fp16"."""
    return "fp32 (no autocast)" if amp_dtype(amp) is None else f"autocast {amp}"


@contextlib.contextmanager
def autocast(device_type: str, amp: str | None):
    """``torch.autocast(device_type, dtype=...)`` for ``amp``, or nothing for None / "none".

    torch disables autocast with only a warning when the device does not support the dtype; here that
    is a RuntimeError naming the device and dtype, so a measurement never claims an autocast it lacked.

    Example:
        >>> with autocast("cpu", "bf16"):
        ...     logits = model(images)
    """
    dtype = amp_dtype(amp)
    if dtype is None:
        yield
        return
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autocast.*not supported.*", category=UserWarning)
        ctx = torch.autocast(device_type, dtype=dtype)
        ctx.__enter__()
    try:
        if not torch.is_autocast_enabled(device_type) or torch.get_autocast_dtype(device_type) != dtype:
            raise RuntimeError(f"torch {torch.__version__} cannot autocast to {dtype} on {device_type!r} "
                               f"(--amp {amp}); use another --amp or device")
        yield
    finally:
        ctx.__exit__(None, None, None)
