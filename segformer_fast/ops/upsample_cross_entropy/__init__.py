"""Bilinear upsampling fused with softmax cross-entropy: SegFormer's loss without full-resolution logits.

reference.py: the pure-PyTorch oracle; triton_kernels.py: Triton kernels; op.py: the
torch.library custom ops dispatching torch (row-chunked composition) / triton / cpp
(csrc/upsample_cross_entropy/*_cpu.cpp) / cuda (csrc/upsample_cross_entropy/*.cu), and the public
:func:`upsample_cross_entropy`.
"""

from .op import upsample_cross_entropy
from .reference import upsample_cross_entropy_reference

__all__ = ["upsample_cross_entropy", "upsample_cross_entropy_reference"]
