"""Drop-in acceleration of existing SegFormer models: ``patch`` and ``unpatch``.

``patch(model)`` swaps, in place, the attention, Mix-FFN and decode head of a model for the fused
layers. The fused layers share the original Parameter and buffer objects (nothing is copied, an
optimizer built before or after keeps working), and state-dict keys, the forward signature and
the outputs stay as they were. Supported:

- ``segformer_fast.SegFormer`` built with ``backend="torch"`` (the reference layers);
- Hugging Face transformers (5.x module names) ``SegformerForSemanticSegmentation``,
  ``SegformerModel`` and ``SegformerForImageClassification``. The fused attention never forms the
  attention probabilities: a forward asked for them (``output_attentions=True``) runs the reference
  (eager) attention of the same weights in every layer and returns them. With ``labels``, a patched
  SegformerForSemanticSegmentation computes its loss with the fused upsample + cross-entropy op, so
  the full-resolution logits are never stored; its class becomes a same-named subclass whose forward
  does this (``copy.deepcopy``, pickling and ``AveragedModel`` copies compute with their own weights).

Also: ``torch.export`` (dynamic H and W included) and ``torch.compile`` see the fused custom ops;
``torch.jit.trace`` traces the reference forward of the same weights; ``torch.onnx.export`` translates
the fused ops with :mod:`segformer_fast.ops.onnx` (registered by ``patch`` when onnxscript is installed).
Models whose weights are not in memory (accelerate offloading, meta tensors) are refused.

transformers 4.x builds its attention from ``SegformerEfficientSelfAttention``; such models are
refused with a clear error rather than patched half-way.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import default_backend, validate_backend
from .nn.attention import SpatialReductionAttention
from .nn.attention_fused import FusedSpatialReductionAttention
from .nn.decode_head import AllMLPDecoder
from .nn.decode_head_fused import FusedAllMLPDecoder
from .nn.mix_ffn import MixFFN
from .nn.mix_ffn_fused import FusedMixFFN

__all__ = ["patch", "unpatch", "is_patched", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = (
    "segformer_fast.SegFormer",
    "transformers.SegformerForSemanticSegmentation",
    "transformers.SegformerModel",
    "transformers.SegformerForImageClassification",
)
_PATCHES = "_segformer_fast_patches"
_MEMORY = ("save", "recompute")


class _Adapter(nn.Module):
    """Stands in for a Hugging Face module: adopts its children (same objects under the same names,
    so the state dict is unchanged) and runs a fused twin that is not a registered submodule.

    The original module is kept (``_original``, sharing those children) for its reference forward:
    under ``torch.jit.trace`` and, for the attention, when attention probabilities are asked for.
    Forward hooks registered on the original (transformers' output capturing among them) carry over.
    """

    def __init__(self, original: nn.Module, fused: nn.Module):
        nn.Module.__init__(self)  # not super(): the attention adapter also derives from the HF class
        if next(original.parameters(recurse=False), None) is not None or next(original.buffers(recurse=False), None) is not None:
            raise TypeError(f"cannot adopt {type(original).__name__}: it holds parameters of its own")
        for name, child in original.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_fused", fused)
        for hooks in _HOOK_DICTS:
            getattr(self, hooks).update(getattr(original, hooks))
        self.train(original.training)

    def fused(self) -> nn.Module:
        self._fused.training = self.training
        return self._fused

    def extra_repr(self) -> str:
        return f"fused={type(self._fused).__name__}({self._fused.extra_repr()})"


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def _attentions_requested(kwargs: dict) -> bool:
    """Whether the running transformers forward collects attention probabilities (``output_attentions``
    as an argument or in the config)."""
    if kwargs.get("output_attentions"):
        return True
    _active_collector = _LAZY_CLASSES.get("output_collector")  # imported with the class: dynamo cannot import
    if _active_collector is None:
        return False
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.get; a compiled forward sets the global
        collected = _active_collector.global_var if getattr(_active_collector, "compiling", False) else None
    else:
        collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _attention_forward(self, hidden_states, height, width, attention_mask=None, **kwargs):
    if attention_mask is not None:
        raise ValueError("patched Segformer attention does not take an attention_mask")
    if _attentions_requested(kwargs) or torch.jit.is_tracing():
        return _reference_attention(self, hidden_states, height, width)
    return self.fused()(hidden_states, (height, width)), None


def _reference_attention(self, hidden_states, height, width):
    """Hugging Face's eager attention on the same weights: (output (B, N, C), probabilities (B, h, N, M)).

    The fused op never forms the (N, M) probabilities, so a forward asked for them runs this instead,
    whatever ``config._attn_implementation`` says (SDPA would return none).
    """
    o = self._original
    b, n, _ = hidden_states.shape
    q = self.q_proj(hidden_states).view(b, n, -1, o.head_dim).transpose(1, 2)  # (B, h, N, d)
    kv = self.sequence_reduction(hidden_states, height, width) if o.sequence_reduction_ratio > 1 else hidden_states
    k = self.k_proj(kv).view(b, kv.shape[1], -1, o.head_dim).transpose(1, 2)  # (B, h, M, d)
    v = self.v_proj(kv).view(b, kv.shape[1], -1, o.head_dim).transpose(1, 2)
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * o.scaling, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = nn.functional.dropout(probs, p=o.attention_dropout, training=self.training)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1)
    return self.o_proj(out), probs


_LAZY_CLASSES: dict = {}


def _patched_attention_class() -> type:
    """PatchedSegformerAttention: a subclass of transformers' SegformerAttention, so that transformers
    installs its attention-capturing hook on it. Built on first use (transformers is optional);
    importable as ``segformer_fast.patch.PatchedSegformerAttention`` (pickle finds it there)."""
    cls = _LAZY_CLASSES.get("PatchedSegformerAttention")
    if cls is None:
        from transformers.models.segformer.modeling_segformer import SegformerAttention

        cls = type("PatchedSegformerAttention", (_Adapter, SegformerAttention),
                   {"forward": _attention_forward, "__module__": __name__, "__qualname__": "PatchedSegformerAttention",
                    "__doc__": "SegformerAttention running the fused sr_attention op (see segformer_fast.patch)."})
        _LAZY_CLASSES["PatchedSegformerAttention"] = cls
        try:  # transformers' collector of the outputs a forward was asked for (5.x)
            from transformers.utils.output_capturing import _active_collector

            _LAZY_CLASSES["output_collector"] = _active_collector
        except ImportError:
            pass
    return cls


def __getattr__(name: str):
    if name == "PatchedSegformerAttention":
        return _patched_attention_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PatchedSegformerMixMLP(_Adapter):
    def forward(self, hidden_states, height, width):
        if torch.jit.is_tracing():  # the fused op takes Python ints; the reference traces with symbolic sizes
            return self._original.forward(hidden_states, height, width)
        return self.fused()(hidden_states, (height, width))


class PatchedSegformerDecodeHead(_Adapter):
    def forward(self, encoder_hidden_states, **kwargs):
        if torch.jit.is_tracing():
            return self._original.forward(encoder_hidden_states, **kwargs)
        feats = []
        for f in encoder_hidden_states:
            if f.ndim == 3:  # reshape_last_stage=False leaves the last stage as (B, N, C)
                side = int(round(f.shape[1] ** 0.5))
                f = f.reshape(f.shape[0], side, side, -1).permute(0, 3, 1, 2)
            feats.append(f)
        return self.fused()(feats)


_BACKEND = "_segformer_fast_backend"


def _fused_loss_forward(self, pixel_values, labels=None, **kwargs):
    """SegformerForSemanticSegmentation's forward with the loss computed by the fused upsample +
    cross-entropy op (full-resolution logits are never stored); outputs and signature as the original's.
    A method of the patched class: it reads this model's own weights (deepcopy, pickle, EMA copies)."""
    from transformers.modeling_outputs import SemanticSegmenterOutput

    from .ops.upsample_cross_entropy import upsample_cross_entropy

    original = self._segformer_fast_base.forward
    if labels is None or self.config.num_labels < 2:  # BCE for a single label: the original's
        return original(self, pixel_values, labels=labels, **kwargs)
    out = original(self, pixel_values, **kwargs)
    logits = out[0] if isinstance(out, tuple) else out.logits
    loss = upsample_cross_entropy(logits, labels, ignore_index=self.config.semantic_loss_ignore_index,
                                  backend=getattr(self, _BACKEND, "auto"))
    if isinstance(out, tuple):
        return (loss,) + out
    return SemanticSegmenterOutput(loss=loss, logits=out.logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions)


def _reduce_patched(self, protocol):
    # pickle / deepcopy: rebuild through _new_patched_model(base), not by the patched class's name
    fn, args, *rest = self._segformer_fast_base.__reduce_ex__(self, protocol)
    return (_new_patched_model, (self._segformer_fast_base,), *rest)


def _new_patched_model(base: type) -> nn.Module:
    return object.__new__(_patched_model_class(base))


def _patched_model_class(base: type) -> type:
    """The patched twin of a SegformerForSemanticSegmentation class: its forward computes the fused loss.

    It keeps the base's name and module, so ``save_pretrained`` writes the same ``architectures`` and
    transformers' per-class registries find it; ``unpatch`` puts the base class back.
    """
    cls = _LAZY_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {
            "forward": _fused_loss_forward, "__reduce_ex__": _reduce_patched, "_segformer_fast_base": base,
            "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__})
        _LAZY_CLASSES[base] = cls
    return cls


def _on_meta(cls, *args, **kwargs):
    with torch.device("meta"):  # the fused twin's own layers are replaced by the original ones
        return cls(*args, **kwargs)


def _hf_attention(m: nn.Module, backend: str, memory: str) -> nn.Module:
    sr = m.sequence_reduction_ratio
    dim = m.q_proj.in_features
    eps = m.sequence_reduction.layer_norm.eps if sr > 1 else 1e-5
    fused = _on_meta(FusedSpatialReductionAttention, dim, m.num_attention_heads, sr, qkv_bias=m.q_proj.bias is not None,
                     attn_drop=float(m.attention_dropout), proj_drop=0.0, sr_eps=eps, backend=backend,
                     memory=memory)
    fused.q, fused.k, fused.v, fused.proj = m.q_proj, m.k_proj, m.v_proj, m.o_proj
    fused.scale = m.scaling
    if sr > 1:
        fused.sr, fused.sr_norm = m.sequence_reduction.sequence_reduction, m.sequence_reduction.layer_norm
    return _patched_attention_class()(m, fused)


def _hf_mlp(m: nn.Module, backend: str, memory: str) -> nn.Module:
    if getattr(m, "activation_fn", None) is not None and type(m.activation_fn).__name__ not in ("GELUActivation",):
        raise TypeError(f"patch() fuses exact GELU only; this Mix-FFN uses {type(m.activation_fn).__name__}")
    fused = _on_meta(FusedMixFFN, m.fc1.in_features, m.fc1.out_features, drop=m.dropout.p, memory=memory,
                     backend=backend)
    fused.fc1, fused.dwconv, fused.fc2, fused.drop = m.fc1, m.dwconv.dwconv, m.fc2, m.dropout
    return PatchedSegformerMixMLP(m, fused)


def _hf_decode_head(m: nn.Module, backend: str) -> nn.Module:
    linears = [p.proj for p in m.linear_projections]
    fused = _on_meta(FusedAllMLPDecoder, [lin.in_features for lin in linears], m.linear_fuse.out_channels,
                     m.classifier.out_channels, dropout=m.dropout.p, dropout2d=isinstance(m.dropout, nn.Dropout2d),
                     backend=backend)
    fused.linear_c = nn.ModuleList(linears)
    fused.fuse, fused.bn, fused.dropout, fused.classifier = m.linear_fuse, m.batch_norm, m.dropout, m.classifier
    return PatchedSegformerDecodeHead(m, fused)


def _replacements(model: nn.Module, backend: str, memory: str):
    """(parent, attribute name, new module) for every module patch() swaps."""
    from .models.segformer import SegFormer

    out = []
    if isinstance(model, SegFormer):
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is SpatialReductionAttention:
                    new = FusedSpatialReductionAttention.from_reference(child, backend=backend, memory=memory)
                    out.append((parent, name, new))
                elif type(child) is MixFFN:
                    out.append((parent, name, FusedMixFFN.from_reference(child, memory=memory, backend=backend)))
                elif type(child) is AllMLPDecoder:
                    out.append((parent, name, FusedAllMLPDecoder.from_reference(child, backend=backend)))
        return out
    kind = type(model).__name__
    if not (kind.startswith("Segformer") and type(model).__module__.startswith("transformers")):
        raise TypeError(f"patch() supports {', '.join(SUPPORTED_MODELS)}; got {type(model).__module__}.{kind}")
    names = {type(m).__name__ for m in model.modules()}
    if "SegformerEfficientSelfAttention" in names:
        raise TypeError("this model uses transformers 4.x Segformer modules, which patch() does not support; "
                        "upgrade transformers to 5.x, or load its weights into segformer_fast.segformer(...) "
                        "with segformer_fast.load_weights")
    for parent in model.modules():
        for name, child in parent.named_children():
            cls = type(child).__name__
            if cls == "SegformerAttention":
                out.append((parent, name, _hf_attention(child, backend, memory)))
            elif cls == "SegformerMixMLP":
                out.append((parent, name, _hf_mlp(child, backend, memory)))
            elif cls == "SegformerDecodeHead":
                out.append((parent, name, _hf_decode_head(child, backend)))
    if not out:
        raise TypeError(f"found no Segformer attention, Mix-FFN or decode head to patch in {kind}")
    return out


def _check_weights_present(model: nn.Module) -> None:
    """Refuse models whose weights are not in memory: accelerate's offloading (``device_map`` with "cpu"
    or "disk" parts) keeps them on the meta device and loads them in hooks around each module's
    forward; the fused layers read the weights directly, inside one op, so they would get meta tensors."""
    offloaded = [name for name, m in model.named_modules()
                 if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if offloaded or meta:
        where = (f"accelerate offloads the weights of {offloaded[0] or type(model).__name__!r}" if offloaded
                 else f"{meta[0]!r} is on the meta device")
        raise ValueError(
            f"patch() needs the model's weights in memory, but {where} ({len(meta)} parameters and buffers on "
            "the meta device). The fused layers read their weights inside one op, past accelerate's offload "
            "hooks. Load the model without offloading (no device_map, or device_map on one device), or run it "
            "unpatched.")


def patch(model: nn.Module, backend: str | None = None, memory: str = "save") -> nn.Module:
    """Swap a SegFormer's attention, Mix-FFN and decode head for fused layers, in place.

    Args:
        model: a ``segformer_fast.SegFormer`` (reference backend) or a transformers Segformer model.
        backend: "auto" (default: ``SEGFORMER_FAST_BACKEND`` or the fastest present), "torch",
            "triton", "cuda" or "cpp". A backend that is not available raises.
        memory: the attention's and Mix-FFN's activation policy, "save" or "recompute" (see
            ``segformer_fast.configs.MemoryMode``).
    Returns:
        The same model object, patched (patching again first undoes the previous patch).

    Example:
        >>> model = SegformerForSemanticSegmentation.from_pretrained("nvidia/segformer-b2-finetuned-ade-512-512")
        >>> segformer_fast.patch(model)
    """
    backend = validate_backend(default_backend() if backend is None else backend)
    if memory not in _MEMORY:
        raise ValueError(f"memory must be one of {_MEMORY}, got {memory!r}")
    if is_patched(model):
        unpatch(model)
    _check_weights_present(model)
    done = []
    for parent, name, new in _replacements(model, backend, memory):
        done.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)
    if type(model).__name__ == "SegformerForSemanticSegmentation":
        object.__setattr__(model, _BACKEND, backend)
        model.__class__ = _patched_model_class(type(model))  # unpatch puts the original class back
    object.__setattr__(model, _PATCHES, done)
    try:  # torch.onnx.export of the patched model (and exporters built on it) then translates the fused ops
        from .ops.onnx import register_onnx_translations

        register_onnx_translations()
    except ImportError:  # no onnxscript: torch.onnx cannot export anything
        pass
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the modules ``patch`` replaced (with the same, possibly trained, parameters)."""
    for parent, name, original in reversed(getattr(model, _PATCHES, [])):
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)
    if hasattr(model, _PATCHES):
        object.__delattr__(model, _PATCHES)
    model.__dict__.pop(_BACKEND, None)
    base = type(model).__dict__.get("_segformer_fast_base")
    if base is not None:
        model.__class__ = base
    return model


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, _PATCHES, None))
