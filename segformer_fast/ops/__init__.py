"""Fused ops. One sub-package per op: its pure-PyTorch reference, its kernels and its dispatch."""

from .dwconv3x3_gelu import dwconv3x3_gelu  # noqa: F401
from .upsample_sum import upsample_sum, upsample_sum_reference  # noqa: F401
from .sr_attention import sr_attention, sr_attention_reference  # noqa: F401
from .upsample_cross_entropy import upsample_cross_entropy, upsample_cross_entropy_reference  # noqa: F401
from .mlp_gelu import mlp_gelu  # noqa: F401
from .conv_bn_relu_up import conv_bn_relu_up  # noqa: F401
from .mix_ffn import mix_ffn  # noqa: F401
from .all_mlp_decoder import all_mlp_decoder_eval, all_mlp_decoder_train  # noqa: F401
