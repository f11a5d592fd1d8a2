"""Conv -> BatchNorm -> ReLU (-> 1x1 classifier) -> bilinear upsample, the stage of SETR's heads.

reference.py: the eager oracle; op.py: BN folded into the conv in eval, the classifier moved
before the upsample, and in training an autograd function that keeps only the stage's input.
"""

from .op import conv_bn_relu_up
from .reference import conv_bn_relu_up_reference

__all__ = ["conv_bn_relu_up", "conv_bn_relu_up_reference"]
