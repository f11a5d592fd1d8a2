"""Layers of SegFormer, built from the ops. The classes here are the pure-PyTorch reference
modules; fast variants share their parameter names so state dicts are interchangeable."""

from .attention import SpatialReductionAttention
from .block import Block, DropPath
from .decode_head import AllMLPDecoder
from .mix_ffn import MixFFN
from .patch_embed import OverlapPatchEmbed

__all__ = ["AllMLPDecoder", "Block", "DropPath", "MixFFN", "OverlapPatchEmbed", "SpatialReductionAttention"]
