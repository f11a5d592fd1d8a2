"""The low-precision tolerance rule of the tests.

A fused path computed in fp16 or bf16 is judged against PyTorch's own low-precision path on the
same inputs, both measured against an fp64 reference:

    err(ours, ref64) <= factor * err(torch_lowp, ref64) + atol,   err = max |a - b| (in fp64)

(the flash-attention tests' rule). An absolute tolerance alone would either hide a real bug in a
half-precision kernel or fail on rounding PyTorch itself makes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["max_error", "lowp_errors", "assert_lowp_close"]


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64; NaN where either has a NaN the other has not (never a silent pass)."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.equal(a64.isnan(), b64.isnan()):
        return float("nan")
    diff = (a64 - b64).abs().nan_to_num(nan=0.0)
    return float(diff.max()) if diff.numel() else 0.0


def lowp_errors(ours: torch.Tensor, torch_lowp: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(err(ours, reference), err(torch_lowp, reference))."""
    return max_error(ours, reference), max_error(torch_lowp, reference)


def assert_lowp_close(ours, torch_lowp, reference, *, atol: float, factor: float = 2.0, name: str = "") -> None:
    """Assert the rule for one tensor or for each entry of matching dicts {name: tensor}.

    Args:
        ours: the fused path's result in fp16/bf16 (or fp32 from a half computation).
        torch_lowp: PyTorch's own computation at the same precision (e.g. the reference module in
            bf16, or under autocast).
        reference: the same computation in fp64.
        atol: the absolute slack, for entries where PyTorch happens to be (near) exact.
    """
    if isinstance(ours, Mapping):
        missing = set(reference) - set(ours)
        if missing:
            raise AssertionError(f"{name}: no result for {sorted(missing)}")
        for key in reference:
            assert_lowp_close(ours[key], torch_lowp[key], reference[key], atol=atol, factor=factor,
                              name=f"{name}{'.' if name else ''}{key}")
        return
    err, err_torch = lowp_errors(ours, torch_lowp, reference)
    bound = factor * err_torch + atol
    if not err <= bound:  # also fails on NaN
        raise AssertionError(f"{name or 'result'}: error {err:.3g} against fp64 exceeds {factor:g} x PyTorch's "
                             f"{err_torch:.3g} + {atol:g} = {bound:.3g} ({ours.dtype})")
