"""Hugging Face interop: build a transformers Segformer carrying a SegFormer's exact weights and class names."""

from __future__ import annotations

from ..configs import SegFormerConfig

__all__ = ["hf_config", "to_hf"]


def hf_config(cfg: SegFormerConfig):
    """The transformers ``SegformerConfig`` of the same architecture (needs transformers).

    The class names are carried: ``cfg.id2label`` (and its ``label2id``) become the Hugging Face
    config's; an unnamed config gets transformers' placeholders "LABEL_0", ...
    """
    from transformers import SegformerConfig

    names = {} if cfg.id2label is None else {"id2label": dict(cfg.id2label), "label2id": cfg.label2id}
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
        **names,
    )


def to_hf(model, attn_implementation: str | None = None):
    """A ``transformers.SegformerForSemanticSegmentation`` with ``model``'s weights and class names.

    The Hugging Face model computes the same logits (same train/eval mode, same device); its
    ``config.id2label`` / ``label2id`` are ``model.config``'s (transformers' "LABEL_0", ... when the
    model has none), so ``save_pretrained`` writes a folder that transformers, the hub and
    :func:`segformer_fast.from_pretrained` all read with the names. The installed transformers' own
    state-dict layout (4.x or 5.x names) is detected from a fresh model. SegFormer only (not SETR).

    Args:
        model: a ``segformer_fast.SegFormer``.
        attn_implementation: the Hugging Face attention to use ("eager", "sdpa", ...; default its own).
    Returns:
        A ``SegformerForSemanticSegmentation``, logits (B, num_classes, H/4, W/4) like ``model``'s.

    Example:
        >>> from segformer_fast.classes import CITYSCAPES_CLASSES
        >>> from segformer_fast.io import to_hf
        >>> model = segformer_fast.segformer("b0", num_classes=19, id2label=CITYSCAPES_CLASSES)
        >>> hf = to_hf(model.eval())
        >>> hf.config.id2label[0]
        'road'
        >>> hf.save_pretrained("segformer-b0-cityscapes")  # config.json + model.safetensors
    """
    from transformers import SegformerForSemanticSegmentation

    from ..models.segformer import SegFormer
    from .weights import detect_layout, export_state_dict

    if not isinstance(model, SegFormer):
        raise TypeError(f"to_hf converts a segformer_fast.SegFormer, got {type(model).__name__}")
    config = hf_config(model.config)
    if attn_implementation:  # "eager", "sdpa", ...
        config._attn_implementation = attn_implementation
    hf = SegformerForSemanticSegmentation(config)
    layout = detect_layout(hf.state_dict().keys())
    hf.load_state_dict(export_state_dict(model, layout), strict=True)
    hf.train(model.training)
    return hf.to(next(model.parameters()).device)
