"""Mix-FFN as one op: fc1 -> depthwise 3x3 conv + GELU (the dwconv3x3_gelu op) -> fc2, keeping less for backward."""

from .op import mix_ffn
from .reference import mix_ffn_reference

__all__ = ["mix_ffn", "mix_ffn_reference"]
