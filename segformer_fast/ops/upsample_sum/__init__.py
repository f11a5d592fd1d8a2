"""Upsample-and-sum (+ per-channel affine, + ReLU): the one pass of SegFormer's fused decoder.

reference.py: the pure-PyTorch oracle; triton_kernels.py: Triton kernels; op.py: the
torch.library custom op dispatching torch / triton / cpp (csrc/upsample_sum/*_cpu.cpp) / cuda
(csrc/upsample_sum/*.cu), and the public :func:`upsample_sum`.
"""

from .op import upsample_sum, upsample_sum_bwd_nhwc, upsample_sum_fwd_nhwc, upsample_sum_nhwc
from .reference import upsample_sum_reference

__all__ = ["upsample_sum", "upsample_sum_nhwc", "upsample_sum_fwd_nhwc", "upsample_sum_bwd_nhwc", "upsample_sum_reference"]
