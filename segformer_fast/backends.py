"""Which implementation runs each fused op, and why the others cannot.

Backends:
- ``torch``: the pure-PyTorch reference modules. Always present; the correctness oracle.
- ``triton``: Triton kernels. Needs the ``triton`` package and a CUDA device, or
  ``TRITON_INTERPRET=1`` set before triton is imported (runs the kernels on the CPU, slowly).
- ``cuda``: the compiled CUDA extension ``segformer_fast._C_cuda`` and a CUDA device.
- ``cpp``: the compiled CPU extension ``segformer_fast._C_cpu`` (C++ with OpenMP).

Test only: ``SEGFORMER_FAST_TEST_CUDA_STANDIN=1`` replaces ``_C_cuda`` by a CPU stand-in
(:mod:`segformer_fast.testing.cuda_standin`) with the same functions, so that ``backend="cuda"``
runs its Python glue on CPU tensors where there is no GPU. "auto" never picks it.

The choice is explicit: a ``backend`` argument per model/module, the environment variable
``SEGFORMER_FAST_BACKEND`` (read by :func:`default_backend` alone), and :func:`available_backends`
to inspect. Which implementation of an op runs for an input is decided by the op's declared spec
and one resolver (:mod:`segformer_fast.dispatch`; ``segformer_fast.explain`` says why).
Asking for a backend that is missing is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendStatus",
    "available_backends",
    "default_backend",
    "validate_backend",
    "cpu_extension",
    "cuda_extension",
    "runs_on",
    "triton_interpret",
]

BACKENDS = ("torch", "triton", "cuda", "cpp")
ENV_VAR = "SEGFORMER_FAST_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is missing, or what it runs on when present


@functools.lru_cache(maxsize=None)
def _import_extension(name: str):
    try:
        return importlib.import_module(f"segformer_fast.{name}"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, str(exc)


def cpu_extension():
    """The compiled CPU extension module, or None when it was not built."""
    return _import_extension("_C_cpu")[0]


def cuda_extension():
    """The compiled CUDA extension module, or None when it was not built (the CPU stand-in under
    ``SEGFORMER_FAST_TEST_CUDA_STANDIN=1``, test only)."""
    if _standin_active():
        from .testing import cuda_standin

        return cuda_standin
    return _import_extension("_C_cuda")[0]


def _standin_active() -> bool:
    from .testing.cuda_standin import active

    return active()


def _cuda_device_present() -> bool:
    import torch

    return torch.cuda.is_available()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except ImportError:
        return BackendStatus("triton", False, "the triton package is not installed (pip install triton)")
    if _cuda_device_present():
        return BackendStatus("triton", True, f"triton {triton.__version__} on CUDA")
    if triton_interpret():
        return BackendStatus("triton", True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1, CPU)")
    return BackendStatus(
        "triton", False, "triton is installed but there is no CUDA device; set TRITON_INTERPRET=1 to run on the CPU (slow)"
    )


def _extension_status(backend: str, module: str, how: str, needs_cuda: bool) -> BackendStatus:
    if needs_cuda and _standin_active():
        from .testing.cuda_standin import ENV_VAR, unavailable_reason

        reason = unavailable_reason()
        if reason:
            return BackendStatus(backend, False, f"{ENV_VAR}=1 selects the CPU stand-in, but {reason}")
        return BackendStatus(backend, True, f"CPU stand-in for segformer_fast.{module} ({ENV_VAR}=1, test only)")
    ext, err = _import_extension(module)
    if ext is None:
        if "No module named" in err:
            err = "not built"
        return BackendStatus(backend, False, f"extension segformer_fast.{module} {err}; {how}")
    if needs_cuda and not _cuda_device_present():
        return BackendStatus(backend, False, f"segformer_fast.{module} is built but there is no CUDA device")
    return BackendStatus(backend, True, f"segformer_fast.{module} loaded")


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and why (not).

    Example:
        >>> import segformer_fast
        >>> segformer_fast.available_backends()["torch"].available
        True
    """
    build = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler)"
    build_cuda = "build it with `pip install --no-build-isolation -e .` where torch has CUDA and nvcc is found"
    return {
        "torch": BackendStatus("torch", True, "pure-PyTorch reference, always present"),
        "triton": _triton_status(),
        "cuda": _extension_status("cuda", "_C_cuda", build_cuda, needs_cuda=True),
        "cpp": _extension_status("cpp", "_C_cpu", build, needs_cuda=False),
    }


def default_backend() -> str:
    """``SEGFORMER_FAST_BACKEND`` if set, else "auto"."""
    return validate_backend(os.environ.get(ENV_VAR, "auto") or "auto", check_available=False)


def validate_backend(backend: str, check_available: bool = True) -> str:
    """Normalise a backend name; raise if it is unknown or (optionally) not available here."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    name = backend.lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if check_available and name != "auto":
        status = available_backends()[name]
        if not status.available:
            raise RuntimeError(f"backend {name!r} is not available: {status.reason}")
    return name


def runs_on(backend: str, device_type: str) -> bool:
    """Whether ``backend`` runs on tensors of ``device_type`` here (Triton on the CPU: the interpreter)."""
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda" or (device_type == "cpu" and _standin_active())
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    return False
