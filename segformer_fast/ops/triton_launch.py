"""What every Triton launcher decides before it launches: the launch configuration and the dtypes.

Launch configuration. A launcher picks its block sizes (and num_warps/num_stages where it sets
them) from the tensor it is given, never from ``torch.cuda.is_available()``: a tensor that is
not on the CPU (cuda, or meta when compiling ahead of time) gets the GPU configuration; a CPU
tensor runs in Triton's interpreter and gets a small one that keeps the interpreter's program
count down. :func:`force_gpu_launch_config` is for tests only: inside it CPU tensors get the GPU
configuration too, so the interpreter runs the block sizes and masks a GPU launch runs.

bfloat16. Triton's interpreter computes bf16 ``tl.dot`` wrongly (a bf16 SegFormer agreed with
the reference on 48% of pixels), so every launcher refuses bf16 CPU tensors under the
interpreter (:func:`check_interpreter_dtypes`); fp16 and fp32 run there, bf16 runs on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..backends import triton_interpret

__all__ = ["gpu_launch_config", "force_gpu_launch_config", "interpreter_refuses",
           "check_interpreter_dtypes"]

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


def interpreter_refuses(t: torch.Tensor) -> bool:
    """True for a bfloat16 CPU tensor under the interpreter, whose bf16 ``tl.dot`` is wrong."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and triton_interpret()


def check_interpreter_dtypes(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise TypeError when a bfloat16 CPU tensor would run through the Triton interpreter.

    Args:
        op: the op's name, for the message.
        tensors: the launcher's tensor arguments (None entries are skipped).
    """
    for t in tensors:
        if t is not None and interpreter_refuses(t):
            raise TypeError(
                f"{op} (triton): the Triton interpreter's bfloat16 arithmetic is wrong (bf16 tl.dot); "
                f"got a bfloat16 tensor of shape {tuple(t.shape)} on the CPU. Use float16 or float32 with the "
                "interpreter, or run bfloat16 on a GPU"
            )
