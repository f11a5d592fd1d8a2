"""Hugging Face interop: build a transformers Segformer carrying a SegFormer's exact weights."""

from __future__ import annotations

from ..configs import SegFormerConfig

__all__ = ["hf_config", "to_hf"]


def hf_config(cfg: SegFormerConfig):
    """The transformers ``SegformerConfig`` of the same architecture (needs transformers)."""
    from transformers import SegformerConfig

    return SegformerConfig(
        num_channels=cfg.in_channels,
        num_encoder_blocks=cfg.num_stages,
        depths=list(cfg.depths),
        sr_ratios=list(cfg.sr_ratios),
        hidden_sizes=list(cfg.hidden_sizes),
        patch_sizes=list(cfg.patch_sizes),
        strides=list(cfg.strides),
        num_attention_heads=list(cfg.num_heads),
        mlp_ratios=list(cfg.mlp_ratios),
        hidden_dropout_prob=cfg.proj_drop,
        attention_probs_dropout_prob=cfg.attn_drop,
        classifier_dropout_prob=cfg.decoder_dropout,
        drop_path_rate=cfg.drop_path_rate,
        decoder_hidden_size=cfg.decoder_dim,
        num_labels=cfg.num_classes,
    )


def to_hf(model, attn_implementation: str | None = None):
    """A ``transformers.SegformerForSemanticSegmentation`` with ``model``'s weights (same train/eval mode).

    The installed transformers' own state-dict layout (4.x or 5.x names) is detected from a fresh model.
    """
    from transformers import SegformerForSemanticSegmentation

    from .weights import detect_layout, export_state_dict

    config = hf_config(model.config)
    if attn_implementation:  # "eager", "sdpa", ...
        config._attn_implementation = attn_implementation
    hf = SegformerForSemanticSegmentation(config)
    layout = detect_layout(hf.state_dict().keys())
    missing, unexpected = hf.load_state_dict(export_state_dict(model, layout), strict=True)
    hf.train(model.training)
    return hf.to(next(model.parameters()).device)
