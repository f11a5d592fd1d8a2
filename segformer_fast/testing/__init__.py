"""Test helpers that ship with the package (not used by the library itself).

- :mod:`segformer_fast.testing.cuda_standin`: the CPU stand-in for the CUDA extension, selected by
  ``SEGFORMER_FAST_TEST_CUDA_STANDIN=1`` (test only), so the CUDA glue runs in CI without a GPU.
"""

from __future__ import annotations

import torch

__all__ = ["backend_device", "perturb_parameters", "tiny_train_config"]


def backend_device(backend: str) -> str:
    """The device a test runs ``backend`` on: "cuda" for the GPU backends ("cuda", "triton") on a
    machine with a CUDA device; else "cpu", where "triton" runs in the interpreter
    (``TRITON_INTERPRET=1``) and "cuda" on the stand-in."""
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def cuda_backend_unavailable_reason(needs: str = "") -> str | None:
    """Why a test of ``backend="cuda"`` cannot run here (None when it can), for collection-time skips.

    With a CUDA device the real extension must be built (and have ``needs``, a function name, when
    given); without one the tests run on the CPU stand-in, which needs the C++ CPU extension.
    """
    if not torch.cuda.is_available():
        from .cuda_standin import unavailable_reason

        return unavailable_reason()
    from ..backends import available_backends, cuda_extension

    ext = cuda_extension()
    if ext is None:
        return available_backends()["cuda"].reason
    if needs and not hasattr(ext, needs):
        return f"segformer_fast._C_cuda was built without {needs}; rebuild it"
    return None


def interpreter_unavailable_reason() -> str | None:
    """Why a test that runs Triton's interpreter on CPU tensors cannot run here (None when it can)."""
    from ..backends import available_backends, triton_interpret

    status = available_backends()["triton"]
    if not status.available:
        return f"triton backend unavailable: {status.reason}"
    if not triton_interpret():
        return "runs Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)"
    return None


def perturb_parameters(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Adds N(0, scale^2) noise to every parameter, in place; returns ``module``.

    Published weights have non-zero biases and affines everywhere; the init's zeros and ones would
    hide a wrong bias or affine path in a comparison.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return module


def tiny_train_config(out, **overrides):
    """A ``TrainConfig`` for a seconds-long run on the synthetic data (B0, 64x64 crops, no workers, no
    progress bar), writing to ``out``; ``overrides`` replace any field."""
    from ..train import TrainConfig

    base = dict(data="synthetic", synthetic_size=64, synthetic_train=16, synthetic_val=4, crop=64, batch=2, steps=4,
                val_every=100, workers=0, out=str(out), progress=False)
    return TrainConfig(**{**base, **overrides})
