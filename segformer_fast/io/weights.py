"""Load and save SegFormer weights in the layouts people actually have.

Layouts (see SEGFORMER.md for the key names):
- ``native``: this package's own state dict (``encoder.stages.{i}...``, ``decoder...``).
- ``hf4``: Hugging Face transformers 4.x / the model hub (``segformer.encoder.block.{i}.{j}...``).
- ``hf5``: Hugging Face transformers 5.x (``segformer.stages.{i}.blocks.{j}...``).
- ``nvlabs``: the official NVlabs code (``patch_embed1``, ``block1.0.attn.kv`` packed K then V, ...).
- ``mmseg``: mmsegmentation 1.x MiT backbone (``layers.{i}.1.{j}.attn.attn.in_proj_weight`` packed
  Q, K, V; 1x1 convs for the FFN). Its decode head is a different function and is not loaded.

Each layout is a list of rules mapping native tensors to source tensors, with a transform each way,
so a layout can be read (``load_weights``) and written (``export_state_dict``) from one description.
LayerNorm epsilons are taken from the source's convention.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..configs import LayerNormEps, SegFormerConfig, check_id2label
from ..utils.atomic import atomic_path

__all__ = [
    "LAYOUTS",
    "CheckpointMismatchError",
    "LoadReport",
    "detect_layout",
    "convert_to_layout",
    "export_state_dict",
    "load_weights",
    "read_state_dict",
    "save_weights",
]

LAYOUTS = ("native", "hf4", "hf5", "nvlabs", "mmseg")

LAYOUT_EPS = {
    "hf4": LayerNormEps(patch=1e-5, sr=1e-5, block=1e-5, stage=1e-5),
    "hf5": LayerNormEps(patch=1e-5, sr=1e-5, block=1e-5, stage=1e-5),
    "nvlabs": LayerNormEps(patch=1e-5, sr=1e-5, block=1e-6, stage=1e-6),
    "mmseg": LayerNormEps(patch=1e-6, sr=1e-6, block=1e-6, stage=1e-6),
}

_FORMAT_TAG = "segformer_fast"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: lists missing and unexpected keys and shape conflicts."""

    def __init__(self, layout: str, missing: list[str], unexpected: list[str], shapes: list[str], note: str = ""):
        self.layout, self.missing, self.unexpected, self.shape_conflicts = layout, missing, unexpected, shapes
        parts = [f"checkpoint (layout {layout!r}) does not match the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape conflicts", shapes)):
            if items:
                shown = "\n    ".join(items[:25])
                more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
                parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
        if note:
            parts.append(f"  note: {note}")
        super().__init__("\n".join(parts))


@dataclass
class LoadReport:
    """What ``load_weights`` did."""

    layout: str
    loaded: int
    decoder_loaded: bool
    ln_eps: LayerNormEps
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_conflicts: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = "encoder + decoder" if self.decoder_loaded else "encoder only (decoder left at its initialisation)"
        lines = [f"loaded {self.loaded} tensors from a {self.layout!r} checkpoint: {head}"]
        for title, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape conflicts", self.shape_conflicts),
            ("ignored", self.ignored),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        return "\n".join(lines)


class BackboneOnlyWarning(UserWarning):
    """A backbone-only checkpoint was loaded; the decoder keeps its initialisation."""


# ----- rules -------------------------------------------------------------------------------------

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    native: tuple[str, ...]
    source: tuple[str, ...]
    to_native: Callable[[Tensors], Tensors] | None = None  # None: identity, one to one
    to_source: Callable[[Tensors], Tensors] | None = None
    decoder: bool = False
    optional: bool = False  # e.g. BatchNorm's num_batches_tracked, absent from old checkpoints


def _rename(native: str, source: str, params=("weight", "bias"), decoder=False) -> list[Rule]:
    return [
        Rule((f"{native}.{p}",), (f"{source}.{p}",), decoder=decoder, optional=p == "num_batches_tracked")
        for p in params
    ]


def _split(n: int) -> Callable[[Tensors], Tensors]:
    return lambda ts: list(ts[0].chunk(n, dim=0))


def _cat(ts: Tensors) -> Tensors:
    return [torch.cat(ts, dim=0)]


def _packed(natives: list[str], source: str, param: str) -> Rule:
    """Several native Linears packed row-wise into one source tensor (NVlabs kv, mmseg in_proj)."""
    n = len(natives)
    return Rule(tuple(f"{m}.{param}" for m in natives), (source,), _split(n), _cat)


def _as_conv1x1(native: str, source: str) -> list[Rule]:
    """A native Linear stored as a 1x1 Conv2d (mmseg FFN)."""
    return [
        Rule((f"{native}.weight",), (f"{source}.weight",), lambda t: [t[0].flatten(1)], lambda t: [t[0][:, :, None, None]]),
        Rule((f"{native}.bias",), (f"{source}.bias",)),
    ]


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _rules(layout: str, cfg: SegFormerConfig) -> list[Rule]:
    """Every tensor of a model with config ``cfg``, as it appears in ``layout``."""
    rules: list[Rule] = []
    for i in range(cfg.num_stages):
        st = f"encoder.stages.{i}"
        for j in range(cfg.depths[i]):
            b = f"{st}.blocks.{j}"
            has_sr = cfg.sr_ratios[i] > 1
            if layout == "hf4":
                s = f"segformer.encoder.block.{i}.{j}"
                pairs = [("norm1", "layer_norm_1"), ("attn.q", "attention.self.query"), ("attn.k", "attention.self.key"),
                         ("attn.v", "attention.self.value"), ("attn.proj", "attention.output.dense"),
                         ("norm2", "layer_norm_2"), ("mlp.fc1", "mlp.dense1"), ("mlp.dwconv", "mlp.dwconv.dwconv"),
                         ("mlp.fc2", "mlp.dense2")]
                if has_sr:
                    pairs += [("attn.sr", "attention.self.sr"), ("attn.sr_norm", "attention.self.layer_norm")]
            elif layout == "hf5":
                s = f"segformer.stages.{i}.blocks.{j}"
                pairs = [("norm1", "layernorm_before"), ("attn.q", "attention.q_proj"), ("attn.k", "attention.k_proj"),
                         ("attn.v", "attention.v_proj"), ("attn.proj", "attention.o_proj"), ("norm2", "layernorm_after"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.dwconv", "mlp.dwconv.dwconv"), ("mlp.fc2", "mlp.fc2")]
                if has_sr:
                    pairs += [("attn.sr", "attention.sequence_reduction.sequence_reduction"),
                              ("attn.sr_norm", "attention.sequence_reduction.layer_norm")]
            elif layout == "nvlabs":
                s = f"block{i + 1}.{j}"
                pairs = [("norm1", "norm1"), ("attn.q", "attn.q"), ("attn.proj", "attn.proj"), ("norm2", "norm2"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.dwconv", "mlp.dwconv.dwconv"), ("mlp.fc2", "mlp.fc2")]
                if has_sr:
                    pairs += [("attn.sr", "attn.sr"), ("attn.sr_norm", "attn.norm")]
                for p in ("weight", "bias"):
                    rules.append(_packed([f"{b}.attn.k", f"{b}.attn.v"], f"{s}.attn.kv.{p}", p))
            elif layout == "mmseg":
                s = f"layers.{i}.1.{j}"
                pairs = [("norm1", "norm1"), ("attn.proj", "attn.attn.out_proj"), ("norm2", "norm2"),
                         ("mlp.dwconv", "ffn.layers.1")]
                if has_sr:
                    pairs += [("attn.sr", "attn.sr"), ("attn.sr_norm", "attn.norm")]
                for p, src_p in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
                    rules.append(_packed([f"{b}.attn.q", f"{b}.attn.k", f"{b}.attn.v"], f"{s}.attn.attn.{src_p}", p))
                rules += _as_conv1x1(f"{b}.mlp.fc1", f"{s}.ffn.layers.0")
                rules += _as_conv1x1(f"{b}.mlp.fc2", f"{s}.ffn.layers.4")
            else:
                s = b
                pairs = [(m, m) for m in ("norm1", "attn.q", "attn.k", "attn.v", "attn.proj", "norm2",
                                          "mlp.fc1", "mlp.dwconv", "mlp.fc2")]
                if has_sr:
                    pairs += [("attn.sr", "attn.sr"), ("attn.sr_norm", "attn.sr_norm")]
            for n_mod, s_mod in pairs:
                rules += _rename(f"{b}.{n_mod}", f"{s}.{s_mod}")
        src = {
            "native": (f"{st}.patch_embed.proj", f"{st}.patch_embed.norm", f"{st}.norm"),
            "hf4": (f"segformer.encoder.patch_embeddings.{i}.proj", f"segformer.encoder.patch_embeddings.{i}.layer_norm",
                    f"segformer.encoder.layer_norm.{i}"),
            "hf5": (f"segformer.stages.{i}.patch_embeddings.proj", f"segformer.stages.{i}.patch_embeddings.layer_norm",
                    f"segformer.stages.{i}.layer_norm"),
            "nvlabs": (f"patch_embed{i + 1}.proj", f"patch_embed{i + 1}.norm", f"norm{i + 1}"),
            "mmseg": (f"layers.{i}.0.projection", f"layers.{i}.0.norm", f"layers.{i}.2"),
        }[layout]
        rules += _rename(f"{st}.patch_embed.proj", src[0])
        rules += _rename(f"{st}.patch_embed.norm", src[1])
        rules += _rename(f"{st}.norm", src[2])
    rules += _decoder_rules(layout, cfg)
    return rules


def _decoder_rules(layout: str, cfg: SegFormerConfig) -> list[Rule]:
    if layout == "mmseg":
        return []  # mmseg 1.x's SegformerHead is a different function (c1..c4 order, ConvModules)
    names = {
        "native": ("decoder.linear_c.{i}", "decoder.fuse", "decoder.bn", "decoder.classifier"),
        "hf4": ("decode_head.linear_c.{i}.proj", "decode_head.linear_fuse", "decode_head.batch_norm", "decode_head.classifier"),
        "hf5": ("decode_head.linear_projections.{i}.proj", "decode_head.linear_fuse", "decode_head.batch_norm",
                "decode_head.classifier"),
        "nvlabs": ("decode_head.linear_c{k}.proj", "decode_head.linear_fuse.conv", "decode_head.linear_fuse.bn",
                   "decode_head.linear_pred"),
    }[layout]
    rules: list[Rule] = []
    for i in range(cfg.num_stages):
        rules += _rename(f"decoder.linear_c.{i}", names[0].format(i=i, k=i + 1), decoder=True)
    rules += _rename("decoder.fuse", names[1], params=("weight",), decoder=True)
    rules += _rename("decoder.bn", names[2], params=_BN, decoder=True)
    rules += _rename("decoder.classifier", names[3], decoder=True)
    return rules


# Keys a checkpoint may carry that have no place in a SegFormer and are skipped, by layout.
_IGNORABLE = {
    "hf4": ("classifier.",),  # SegformerForImageClassification's ImageNet head (nvidia/mit-b*)
    "hf5": ("classifier.",),
    "nvlabs": ("head.", "decode_head.conv_seg.", "decode_head.linear_pred_aux"),
    "mmseg": ("head.",),
}


def apply_rules(rules: list[Rule], sd: Mapping[str, torch.Tensor]):
    """Native tensors from a source state dict by ``rules``.

    Returns (converted {native key: tensor}, missing source keys, used source keys, has_decoder).
    A checkpoint with no decoder tensors at all is backbone-only: its decoder rules are not missing.
    """
    has_decoder = any(s in sd for r in rules if r.decoder for s in r.source)
    converted: dict[str, torch.Tensor] = {}
    missing, used = [], set()
    for rule in rules:
        present = [s in sd for s in rule.source]
        if not all(present):
            if not (rule.optional or (rule.decoder and not has_decoder)):
                missing += [s for s, p in zip(rule.source, present) if not p]
            continue
        tensors = [sd[s] for s in rule.source]
        used.update(rule.source)
        converted.update(zip(rule.native, rule.to_native(tensors) if rule.to_native else tensors))
    return converted, missing, used, has_decoder


# ----- reading sources ---------------------------------------------------------------------------


def _torch_load(path: str):
    """``torch.load(path, weights_only=True)``, with a failure said in one line about the file (torch's own
    advice to pass ``weights_only=False``, i.e. to run the file's code, is not passed on)."""
    import pickle

    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read {path!r}: the file is empty")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise ValueError(f"cannot read {path!r}: not a PyTorch checkpoint, or a damaged one") from None
        raise ValueError(f"cannot read {path!r}: it holds a Python object ({found.group(1)}) besides tensors, which "
                         "is not loaded (unpickling it could run code); save the state_dict alone, or convert the "
                         "file to .safetensors") from None
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors of a file that is not a checkpoint
        raise ValueError(f"cannot read {path!r}: not a PyTorch checkpoint, or a truncated one "
                         f"({type(exc).__name__}{': ' + str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path!r} holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def read_state_dict(source) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A flat state dict (and safetensors metadata, if any) from a path, a dict or a model object."""
    metadata: dict[str, str] = {}
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint file at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    metadata = dict(f.metadata() or {})
                    sd = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError, ValueError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(f"cannot read {path!r}: {reason} (a truncated or damaged safetensors file)") from None
        elif path.endswith((".bin", ".pth", ".pt", ".ckpt")):
            sd = _torch_load(path)
        else:
            raise ValueError(f"unsupported checkpoint file {path!r}: expected .safetensors, .bin, .pth, .pt or .ckpt")
    elif isinstance(source, nn.Module):
        sd = source.state_dict()
    elif isinstance(source, Mapping):
        sd = dict(source)
    else:
        raise TypeError(
            f"cannot read weights from a {type(source).__name__}; pass a path, a state dict or a Segformer model"
        )
    for wrapper in ("state_dict", "model", "module"):  # training checkpoints wrap the weights
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    flat = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # meta entries (e.g. mmseg's "meta")
        if k.startswith("module."):
            k = k[len("module.") :]
        flat[k] = v
    return flat, metadata


def detect_layout(keys) -> str:
    """Which layout a set of state-dict keys is in, or ValueError naming a few keys."""
    keys = list(keys)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("encoder.stages.") and has(".patch_embed."):
        return "native"
    if has("stages.") and (has("layernorm_before") or has("patch_embeddings.proj")):
        return "hf5"
    if has("encoder.block.") or has("encoder.patch_embeddings."):
        return "hf4"
    if has("layers.0.0.projection"):
        return "mmseg"
    if has("patch_embed1.") or has("block1."):
        return "nvlabs"
    raise ValueError(
        "cannot tell the checkpoint's layout (expected native, hf4, hf5, nvlabs or mmseg keys); "
        f"first keys: {keys[:5]}"
    )


def _normalise_keys(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if layout in ("hf4", "hf5"):
            if k.startswith(("encoder.", "stages.")):  # a bare SegformerModel's state dict
                k = "segformer." + k
        elif layout in ("nvlabs", "mmseg") and k.startswith("backbone."):
            k = k[len("backbone.") :]
        out[k] = v
    return out


# ----- load / export / save ----------------------------------------------------------------------


_EPS_ROLES = (
    ("patch", "encoder.stages.0.patch_embed.norm"),
    ("stage", "encoder.stages.0.norm"),
    ("block", "encoder.stages.0.blocks.0.norm1"),
    ("sr", "encoder.stages.0.blocks.0.attn.sr_norm"),
)


def _module_eps(source: nn.Module, layout: str, cfg: SegFormerConfig) -> LayerNormEps:
    """LayerNorm epsilons read off a model object's modules (exact, whatever its version's convention)."""
    mods = dict(source.named_modules())
    where = {r.native[0]: r.source[0] for r in _rules(layout, cfg) if len(r.native) == 1}
    found = {}
    for role, native in _EPS_ROLES:
        src = where.get(f"{native}.weight")
        if src is None:
            continue
        name = src.rsplit(".", 1)[0]
        m = mods.get(name, mods.get(name.removeprefix("segformer.")))
        if isinstance(m, nn.LayerNorm):
            found[role] = m.eps
    return LayerNormEps(**{**LAYOUT_EPS[layout].__dict__, **found})


def load_weights(model, source, strict: bool = True) -> LoadReport:
    """Load weights of any supported layout into a SegFormer.

    Args:
        model: a ``segformer_fast.SegFormer``.
        source: a path (.safetensors, .bin, .pth), a state dict, or a model object (a Hugging Face
            ``Segformer*`` model or another SegFormer).
        strict: raise :class:`CheckpointMismatchError` on missing encoder tensors, unexpected keys or
            shape conflicts. A backbone-only checkpoint is accepted in strict mode: the decoder keeps
            its initialisation and a ``BackboneOnlyWarning`` says so.
    Returns:
        A :class:`LoadReport` (layout, counts, what was missing or ignored, the epsilons applied).
        An unnamed model whose decoder was loaded takes the source's class names, if it has names
        for that many classes (see :func:`adopt_class_names`).

    Example:
        >>> model = segformer_fast.segformer("b0", num_classes=150)
        >>> print(segformer_fast.load_weights(model, "segformer-b0-ade.safetensors"))
    """
    from ..models.segformer import SegFormer

    if not isinstance(model, SegFormer):
        raise TypeError(f"load_weights needs a segformer_fast.SegFormer, got {type(model).__name__}")
    raw, metadata = read_state_dict(source)
    if not raw:
        raise ValueError("the checkpoint holds no tensors")
    layout = detect_layout(raw.keys())
    sd = _normalise_keys(raw, layout)
    cfg = model.config
    target = model.state_dict()

    converted, missing, used, has_decoder = apply_rules(_rules(layout, cfg), sd)

    ignored, unexpected = [], []
    for k in sd:
        if k in used:
            continue
        if k.startswith(_IGNORABLE.get(layout, ())):
            ignored.append(k)
        else:
            unexpected.append(k)
    note = ""
    if layout == "mmseg" and any(k.startswith("decode_head.") for k in unexpected):
        note = ("mmseg 1.x's decode head (SegformerHead: c1..c4 order, a ConvModule per stage) is a different "
                "function from the All-MLP decoder and cannot be loaded; load with strict=False to take the backbone")

    shapes = []
    for k, t in converted.items():
        if k not in target:
            unexpected.append(k)
        elif tuple(t.shape) != tuple(target[k].shape):
            shapes.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(target[k].shape)}")
        elif target[k].is_floating_point() and not t.is_floating_point():
            raise TypeError(f"checkpoint tensor for {k} has non-float dtype {t.dtype}; expected floating-point weights")
    if strict and (missing or unexpected or shapes):
        raise CheckpointMismatchError(layout, missing, unexpected, shapes, note)

    with torch.no_grad():
        loaded = 0
        for k, t in converted.items():
            if k in target and tuple(t.shape) == tuple(target[k].shape):
                target[k].copy_(t.to(target[k].dtype))
                loaded += 1

    eps = None
    if layout == "native" and "config" in metadata:
        eps = SegFormerConfig.from_dict(json.loads(metadata["config"])).ln_eps
    elif isinstance(source, nn.Module) and layout != "native":
        eps = _module_eps(source, layout, cfg)
    elif isinstance(source, nn.Module):
        eps = source.config.ln_eps
    if eps is None:
        eps = LAYOUT_EPS.get(layout, cfg.ln_eps)
    model.set_layer_norm_eps(eps)

    if has_decoder:
        adopt_class_names(model, source, metadata)
    report = LoadReport(layout, loaded, has_decoder, eps, missing, unexpected, shapes, ignored)
    if not has_decoder:
        warnings.warn(
            f"backbone-only checkpoint ({layout}): loaded {loaded} encoder tensors; the decoder keeps its "
            "initialisation and needs training",
            BackboneOnlyWarning,
            stacklevel=2,
        )
    return report


def adopt_class_names(model, source, metadata: Mapping[str, str]) -> None:
    """Give an unnamed ``model`` the class names ``source`` carries, when they fit its classifier.

    The names come from a file's metadata config (``save_weights``) or a model object's
    ``config.id2label`` (ours or a Hugging Face one; transformers' "LABEL_k" placeholders are no
    names). A model that already has names keeps them.
    """
    if model.config.id2label is not None:
        return
    names = None
    if "config" in metadata:
        with contextlib.suppress(ValueError, AttributeError):
            names = json.loads(metadata["config"]).get("id2label")
    elif isinstance(source, nn.Module):
        names = getattr(getattr(source, "config", None), "id2label", None)
    if not names:
        return
    try:
        names = check_id2label(names, model.config.num_classes)
    except ValueError:
        return  # another head size or unusable names: the model stays unnamed
    if not all(name == f"LABEL_{k}" for k, name in names.items()):
        model.config = model.config.replace(id2label=names)


def export_state_dict(model, layout: str = "native", backbone_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights in another layout (for tools that read that layout, and round-trip tests).

    Args:
        model: a SegFormer.
        layout: one of ``LAYOUTS``; "mmseg" is backbone-only by nature.
        backbone_only: leave the decoder out.
    Returns:
        A new state dict (contiguous copies) keyed as ``layout`` names them.
    """
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.contiguous().clone() for k, v in convert_to_layout(sd, model.config, layout, backbone_only).items()}


def convert_to_layout(native: Mapping[str, torch.Tensor], cfg: SegFormerConfig, layout: str,
                      backbone_only: bool = False) -> dict[str, torch.Tensor]:
    """Rename/reshape a native-keyed dict of tensors (weights, or their gradients) into ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    out = {}
    for rule in _rules(layout, cfg):
        if (backbone_only and rule.decoder) or not all(n in native for n in rule.native):
            continue
        tensors = [native[n] for n in rule.native]
        out.update(zip(rule.source, rule.to_source(tensors) if rule.to_source else tensors))
    return out


def save_weights(model, path: str | os.PathLike, layout: str = "native") -> None:
    """Write the model's weights to a .safetensors file atomically (temp file + rename).

    The native layout stores the model config in the file's metadata, so
    ``segformer_fast.from_pretrained(path)`` rebuilds the same model (LayerNorm epsilons and class
    names, ``config.id2label``, included).
    A SETR is written in the native layout only, with ``architecture`` "setr", its SETRConfig and
    whether it has auxiliary heads.
    """
    from safetensors.torch import save_file

    from ..models.setr import SETR

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_weights writes safetensors; the path must end in .safetensors, got {path!r}")
    metadata = {"format": "pt", "producer": _FORMAT_TAG, "layout": layout}
    if isinstance(model, SETR):
        if layout != "native":
            raise ValueError(f"a SETR is saved in the native layout only, got layout={layout!r}")
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        metadata.update(architecture="setr", aux=json.dumps(model.aux))
    else:
        tensors = export_state_dict(model, layout)
    if layout == "native":
        metadata["config"] = json.dumps(model.config.to_dict())
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
