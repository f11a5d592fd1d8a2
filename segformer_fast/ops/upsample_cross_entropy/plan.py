"""The loss backward's column plan: how many low-res columns (COLS) a program owns, and the output
columns (BLOCK_C) it computes for them. Pure Python, shared by the launcher and the cost model."""

from __future__ import annotations

import functools
import math

from ..cost import next_pow2

__all__ = ["column_plan"]


def _first_taps(w: int, W: int) -> tuple[list[int], list[int]]:
    # Per output column o, the lowest and highest first tap i0 = min(floor(max(src, 0)), w - 1) that
    # src = scale (o + 0.5) - 0.5 can give once rounded: the kernels compute src in fp32 (scale itself
    # rounded, perhaps with a fused multiply-add), so src is taken +- a margin far above those errors.
    scale, lo, hi = w / W, [], []
    for o in range(W):
        src = scale * (o + 0.5) - 0.5
        eps = 1e-6 * (abs(src) + 1.0)
        lo.append(min(int(math.floor(max(src - eps, 0.0))), w - 1))
        hi.append(min(int(math.floor(max(src + eps, 0.0))), w - 1))
    return lo, hi


def _widest(lo: list[int], hi: list[int], w: int, cols: int) -> int:
    # The most output columns whose first tap may be in [j, j + cols] over the programs' runs
    # j = -1, cols - 1, 2 cols - 1, ... (a program owns columns j + 1 .. j + cols).
    widest = 0
    for j in range(-1, w, cols):
        widest = max(widest, sum(1 for a, b in zip(lo, hi) if a <= j + cols and b >= j))
    return widest


@functools.lru_cache(maxsize=256)
def column_plan(w: int, W: int, block_j: int = 16) -> tuple[int, int]:
    """(COLS, BLOCK_C) for w low-res columns upsampled to W: BLOCK_C is 32 (16 when fewer columns do
    for the most COLS, more only when even one column needs it: upsampling by more than ~14), COLS
    the most low-res columns, at most block_j - 2, whose readers fit BLOCK_C, counted exactly
    from the tap rule (a fixed slack would waste a quarter of the lanes at x4: 6 columns, not 7).

    Example:
        >>> column_plan(256, 1024)  # x4: 8 first taps x 4 output columns = 32
        (7, 32)
    """
    lo, hi = _first_taps(w, W)
    block_c = min(32, max(16, next_pow2(math.ceil((block_j - 1) * W / w) + 3)))
    block_c = max(block_c, next_pow2(_widest(lo, hi, w, 1)))  # one column always fits
    cols = 1
    while cols < block_j - 2 and _widest(lo, hi, w, cols + 1) <= block_c:
        cols += 1
    return cols, block_c
