"""SegFormer's All-MLP decode head as one op (fold, eval pass, training autograd), beside its reference."""

from .op import all_mlp_decoder_eval, all_mlp_decoder_train, fold_weights
from .reference import all_mlp_decoder_reference

__all__ = ["all_mlp_decoder_eval", "all_mlp_decoder_train", "fold_weights", "all_mlp_decoder_reference"]
