"""The vocabulary of the per-op cost models (``segformer_fast/ops/<op>/cost.py``), used by
benchmarks/roofline.py.

Each op's ``cost.py`` has ``roofline(**shapes) -> {"forward": Cost, "backward": Cost}``. A
:class:`Cost` holds the op's minimum (what any implementation must read, write and compute) and the
:class:`Part` list of what its kernels AS WRITTEN do, one part per launch (Triton kernel or torch
glue). Bytes are DRAM bytes: a part's comment says which re-reads it counts and which it assumes hit
the L2 cache. FLOPs: ``gemm`` is tensor-core matmul work; ``other`` is everything else in fp32, with
each transcendental counted as the fp32 work its issue time displaces (:data:`EXP_FLOPS`,
:data:`ERF_FLOPS`), so one rate (fp32 non-tensor) prices both. Every count is an estimate on paper:
the constants below say how each was reached, so whoever changes a kernel updates its model beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BF16", "FP32", "INT64", "BOOL", "L2_BYTES", "SMS", "EXP_FLOPS", "ERF_FLOPS", "LERP2D_FLOPS", "LERP_MIN_FLOPS",
           "TF32_GEMM_WEIGHT", "Part", "Cost",
           "cdiv", "next_pow2"]

BF16, FP32, INT64, BOOL = 2, 4, 8, 1  # bytes per element
L2_BYTES = 50 * 2**20  # H100/H200 L2: 50 MB; a re-read whose working set fits is assumed to hit
SMS = 132  # H100/H200 SXM streaming multiprocessors (for the programs-per-SM notes)
# One exp (tl.exp/exp2 -> MUFU.EX2): the SFU issues 16 per SM per clock against 128 fp32 FMA lanes,
# so an exp displaces 8 FMAs = 16 flops of fp32 issue time.
EXP_FLOPS = 16
# One erf (libdevice erff): a ~10-term polynomial in FMAs plus a few selects, about 20 flops (estimate).
ERF_FLOPS = 20
# One bilinear sample from its 4 taps (triton_math.lerp2d): the four weight products are formed once per pixel
# and shared by its channels (or classes), so per value a multiply and 3 FMAs, w00 v00 + w01 v01 + w10 v10 + w11 v11:
# 7 flops.
LERP2D_FLOPS = 7
# The least a bilinear upsampling (or its adjoint) needs per output value: done separably, a 2-tap lerp
# (3 flops) along one axis per output, the other axis's pass amortised over the upsampling factor (>= 1).
LERP_MIN_FLOPS = 4
# A tf32 tensor-core flop counted as this many bf16 ones (``gemm`` is priced at the bf16 rate): dense tf32 is half
# of dense bf16 on H100/H200 SXM (NVIDIA datasheet: 495 against 989 TFLOP/s).
TF32_GEMM_WEIGHT = 2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Part:
    """One launch of the op as written: DRAM bytes moved, tensor-core and other flops, and why."""

    name: str
    bytes: float
    gemm_flops: float = 0.0
    other_flops: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Cost:
    """One direction (forward or backward) of one op call at fixed shapes.

    Attributes:
        gemm_flops, other_flops: the minimum work (tensor-core matmul flops; everything else, with
            transcendentals priced as in the module docstring).
        min_bytes: every input read once and every output written once, in the op's storage dtypes.
        parts: the launches as written; :attr:`kernel_bytes` etc. are their sums.
        exps: the minimum count of exp evaluations (informational; already inside other_flops).
        notes: what the minimum counts, in a sentence.
    """

    gemm_flops: float
    other_flops: float
    min_bytes: float
    parts: tuple[Part, ...] = field(default_factory=tuple)
    exps: float = 0.0
    notes: str = ""

    @property
    def kernel_bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def kernel_gemm_flops(self) -> float:
        return sum(p.gemm_flops for p in self.parts)

    @property
    def kernel_other_flops(self) -> float:
        return sum(p.other_flops for p in self.parts)

    def scaled(self, n: int) -> "Cost":
        """This cost repeated ``n`` times (e.g. over a stage's layers)."""
        parts = tuple(Part(p.name, p.bytes * n, p.gemm_flops * n, p.other_flops * n, p.note) for p in self.parts)
        return Cost(self.gemm_flops * n, self.other_flops * n, self.min_bytes * n, parts, self.exps * n, self.notes)
