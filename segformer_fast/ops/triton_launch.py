"""What every Triton launcher decides before it launches: the launch configuration and the dtypes.

Launch configuration. A launcher picks its block sizes (and num_warps/num_stages where it sets
them) from the tensor it is given, never from ``torch.cuda.is_available()``: a tensor that is
not on the CPU (cuda, or meta when compiling ahead of time) gets the GPU configuration; a CPU
tensor runs in Triton's interpreter and gets a small one that keeps the interpreter's program
count down. :func:`force_gpu_launch_config` is for tests only: inside it CPU tensors get the GPU
configuration too, so the interpreter runs the block sizes and masks a GPU launch runs.

Autotuning (:class:`Autotuner`). A kernel declares a few launch configurations; on a GPU the first
launch for a key (GPU, dtype and the kernel's layer-shape facts, never the image size) times them
all and keeps the fastest; everywhere else the first, declared default, runs.

bfloat16. Triton's interpreter computes bf16 ``tl.dot`` wrongly (a bf16 SegFormer agreed with
the reference on 48% of pixels), so every launcher refuses bf16 CPU tensors under the
interpreter (:func:`check_interpreter_dtypes`); fp16 and fp32 run there, bf16 runs on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..backends import triton_interpret

__all__ = ["gpu_launch_config", "force_gpu_launch_config", "interpreter_refuses",
           "check_interpreter_dtypes", "dot_precision", "LaunchConfig", "Autotuner", "autotuners", "register_autotuner",
           "AUTOTUNE_ENV"]

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


def dot_precision(dtype: torch.dtype) -> str:
    """A kernel's ``tl.dot`` input precision: fp32 inputs use TF32 tensor cores when PyTorch's matmuls may
    (``torch.backends.cuda.matmul.allow_tf32``, read at every call), else exact fp32 ("ieee", FMAs).
    fp16/bf16 dots are tensor-core dots whatever the flag ("tf32" is Triton's default there)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ---------------------------------------------------------------------------------------------
# Autotuning over a small declared set of configurations


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration of a kernel: its block-size constexprs, ``num_warps`` and ``num_stages``.

    Example:
        >>> LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3).kwargs()
        {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 3}
    """

    meta: Mapping[str, int]
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        """The keyword arguments of ``kernel[grid](..., **config.kwargs())``."""
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs().items())

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.meta.items())), self.num_warps, self.num_stages))


AUTOTUNE_ENV = "SEGFORMER_FAST_AUTOTUNE"  # "0": never time, always the declared default (configs[0])


class Autotuner:
    """A kernel's declared configurations and, per key, the one measured fastest on this GPU.

    The key is what changes the best configuration -- the dtype, the GPU, and what the kernel says
    (head dim, channel count, number of maps) -- and never the image size: a model that sees many
    image sizes is timed once per layer shape, not once per size. The first configuration is the
    declared default: it runs wherever nothing is timed (the interpreter, meta tensors compiled ahead
    of time, ``SEGFORMER_FAST_AUTOTUNE=0``). A kernel that declares more than one configuration must
    also have each of them compiled by benchmarks/aot_compile.py (:func:`autotuners` lists them), so
    the report covers whatever the tuner can pick.

    Timing runs the real launch once per configuration (``triton.testing.do_bench``) on the call's own
    tensors; the kernels are deterministic and write their outputs whole (no atomics, no accumulation
    into inputs), so a timed launch leaves the same result as one launch.

    Example:
        >>> TUNER = Autotuner("dwconv_fwd", [LaunchConfig({"BLOCK_C": 64}), LaunchConfig({"BLOCK_C": 128}, 8)])
        >>> cfg = TUNER.pick(x, lambda c: _kernel[grid(c)](..., **c.kwargs()), key=(channels,))
    """

    def __init__(self, name: str, configs: Sequence[LaunchConfig]):
        if not configs:
            raise ValueError(f"autotuner {name!r} needs at least one configuration")
        self.name, self.configs = name, tuple(configs)
        self.chosen: dict[tuple, LaunchConfig] = {}
        self.timings: dict[tuple, list[float]] = {}
        self.forced: LaunchConfig | None = None

    @property
    def default(self) -> LaunchConfig:
        return self.configs[0]

    def pick(self, t: torch.Tensor, launch: Callable[[LaunchConfig], object], key: tuple = ()) -> LaunchConfig:
        """The configuration to launch for ``t``; on a GPU the first call for a key times every one.

        Args:
            t: the launch's main tensor (its device and dtype join the key).
            launch: runs the kernel with a configuration (used only for timing).
            key: the kernel's shape facts that change the best configuration (not the image size).
        """
        if self.forced is not None:
            return self.forced
        gpu = _timing_device(t)
        if gpu is None or len(self.configs) == 1 or os.environ.get(AUTOTUNE_ENV, "1") == "0":
            return self.default
        full = (gpu, str(t.dtype), *key)
        found = self.chosen.get(full)
        if found is None:
            if _capturing(t):  # nothing is timed inside a CUDA graph capture: the default, until a call outside one
                return self.default
            times = [_time_launch(launch, cfg) for cfg in self.configs]
            found = self.configs[min(range(len(times)), key=times.__getitem__)]
            self.chosen[full], self.timings[full] = found, times
        return found


    @contextlib.contextmanager
    def forcing(self, cfg: LaunchConfig) -> Iterator[None]:
        """Every :meth:`pick` returns ``cfg`` (one of the declared configurations) meanwhile: the tests run
        each configuration through the interpreter, and benchmarks/aot_compile.py compiles each."""
        if cfg not in self.configs:
            raise ValueError(f"autotuner {self.name!r}: {cfg} is not one of its configurations")
        before, self.forced = self.forced, cfg
        try:
            yield
        finally:
            self.forced = before


def _timing_device(t: torch.Tensor) -> str | None:
    """The name of the GPU ``t`` is on (part of the key), or None where nothing is timed (CPU, meta)."""
    return torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else None


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is capturing a CUDA graph (timing would synchronize inside the capture)."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _time_launch(launch: Callable[[LaunchConfig], object], cfg: LaunchConfig) -> float:
    """Median milliseconds of ``launch(cfg)`` on the GPU; inf for a configuration that fails to compile or
    launch (e.g. too much shared memory on this GPU), so it is never chosen."""
    from triton.testing import do_bench

    try:
        return float(do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median"))
    except Exception:  # noqa: BLE001 - an out-of-resources config is a valid outcome of tuning, not an error
        return math.inf


def autotuners() -> dict[str, Autotuner]:
    """Every registered kernel autotuner by name."""
    return dict(_REGISTRY)


def register_autotuner(tuner: Autotuner) -> Autotuner:
    """Add ``tuner`` to :func:`autotuners`; a kernel module calls it once at import."""
    _REGISTRY[tuner.name] = tuner
    return tuner


_REGISTRY: dict[str, Autotuner] = {}
