"""Transformer MLP, Linear -> GELU -> Linear, keeping less for backward.

reference.py: the eager oracle; op.py: the custom op (ops/fused.py) that keeps the input (and, in "save"
mode, the pre-activation) and recomputes the rest in backward, and the public :func:`mlp_gelu`.
"""

from .op import mlp_gelu
from .reference import mlp_gelu_reference

__all__ = ["mlp_gelu", "mlp_gelu_reference"]
