"""What every Triton launcher decides before it launches: the launch configuration.

Launch configuration. A launcher picks its block sizes (and num_warps/num_stages where it sets
them) from the tensor it is given, never from ``torch.cuda.is_available()``: a tensor that is
not on the CPU (cuda, or meta when compiling ahead of time) gets the GPU configuration; a CPU
tensor runs in Triton's interpreter and gets a small one that keeps the interpreter's program
count down. :func:`force_gpu_launch_config` is for tests only: inside it CPU tensors get the GPU
configuration too, so the interpreter runs the block sizes and masks a GPU launch runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["gpu_launch_config", "force_gpu_launch_config"]

_forced = 0  # depth of nested force_gpu_launch_config() blocks


def gpu_launch_config(t: torch.Tensor) -> bool:
    """True when a launch for ``t`` uses the GPU configuration: ``t`` is not on the CPU, or a test forces it."""
    return t.device.type != "cpu" or _forced > 0


@contextlib.contextmanager
def force_gpu_launch_config() -> Iterator[None]:
    """Test-only: launches for CPU tensors (the interpreter) use the GPU block sizes inside this block.

    Example:
        >>> with force_gpu_launch_config():
        ...     assert gpu_launch_config(torch.zeros(1))
    """
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1

