"""Spatial-reduction attention (MiT's efficient self-attention), fused and memory-linear.

reference.py: the eager oracle (Conv2d + LayerNorm + explicit softmax); reduce.py: the reduction
as a matmul over patches of the token layout; triton_kernels.py: flash-style forward and backward;
op.py: the torch.library custom op dispatching torch / triton / cuda (csrc/sr_attention/), and the
public :func:`sr_attention`.
"""

from .op import sr_attention
from .reference import sr_attention_reference

__all__ = ["sr_attention", "sr_attention_reference"]
