"""Model variants as data: one frozen dataclass per architecture and a registry of named variants."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["MemoryMode", "MEMORY_MODES", "LAYER_MEMORY_MODES",
           "LayerNormEps", "SegFormerConfig", "SEGFORMER_VARIANTS", "get_config",
           "SETRConfig", "SETR_DECODERS", "SETR_VARIANTS", "SETR_MODELS", "get_setr_config", "check_id2label"]


class MemoryMode(str, enum.Enum):
    """What training keeps for backward. A ``str`` enum: ``MemoryMode.SAVE == "save"``.

    - ``SAVE``: the fused ops' own minimum (the fused FFN/MLP keeps its input and fc1's output; the
      fused attention its input, row log-sum-exp and output before the projection).
    - ``RECOMPUTE``: the fused FFN/MLP keeps only its input, the fused attention its input and
      log-sum-exp; each recomputes the rest in backward.
    - ``CHECKPOINT``: ``RECOMPUTE`` in the layers plus activation checkpointing of whole blocks
      (and, in SegFormer, the patch embeddings, stage norms and decoder): each keeps only its input
      and reruns its forward in backward.

    Models take all three; a layer takes ``LAYER_MEMORY_MODES`` (see :attr:`layer`).

    Example:
        >>> MemoryMode.parse("checkpoint").layer
        <MemoryMode.RECOMPUTE: 'recompute'>
    """

    SAVE = "save"
    RECOMPUTE = "recompute"
    CHECKPOINT = "checkpoint"

    @classmethod
    def parse(cls, value, allowed=None) -> "MemoryMode":
        """The mode named by ``value`` (a string or a MemoryMode).

        Args:
            value: "save", "recompute", "checkpoint" or a MemoryMode.
            allowed: the modes accepted (default: all of them).
        Returns:
            The MemoryMode. Raises ValueError naming the accepted modes for anything else.
        """
        names = MEMORY_MODES if allowed is None else tuple(cls(a).value for a in allowed)
        if value not in names:
            raise ValueError(f"memory must be one of {names}, got {value!r}")
        return cls(value)

    @property
    def layer(self) -> "MemoryMode":
        """The mode for the layers inside a block: checkpointing is the model's, so CHECKPOINT -> RECOMPUTE."""
        return MemoryMode.RECOMPUTE if self is MemoryMode.CHECKPOINT else self


MEMORY_MODES: tuple[str, ...] = tuple(m.value for m in MemoryMode)  # all modes (argparse choices)
LAYER_MEMORY_MODES: tuple[str, ...] = (MemoryMode.SAVE.value, MemoryMode.RECOMPUTE.value)  # a layer's modes


def check_id2label(id2label, num_classes: int, owner: str = "config") -> dict[int, str] | None:
    """``id2label`` as a new ``{0: name, ..., num_classes - 1: name}`` dict, or None (no names).

    Accepts a mapping with int keys or their strings (as JSON writes them, e.g. a Hugging Face
    ``config.json``) or a sequence of names in class order. Raises ValueError naming the problem:
    a count that differs from ``num_classes``, keys that are not 0..num_classes-1, a name that is not
    a string.
    """
    if id2label is None:
        return None
    if isinstance(id2label, str) or not isinstance(id2label, (Mapping, list, tuple)):
        raise ValueError(f"{owner}.id2label must be a dict {{class id: name}} or a list of names, "
                         f"got {type(id2label).__name__}")
    items = id2label.items() if isinstance(id2label, Mapping) else enumerate(id2label)
    names: dict[int, str] = {}
    for key, name in items:
        try:
            k = int(key)
            if isinstance(key, bool) or (isinstance(key, str) and key.strip() != str(k)):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{owner}.id2label has key {key!r}, expected class ids 0..{num_classes - 1}") from None
        if not isinstance(name, str):
            raise ValueError(f"{owner}.id2label[{k}] is {name!r}, expected a string")
        if k in names:
            raise ValueError(f"{owner}.id2label names class {k} twice")
        names[k] = name
    if len(names) != num_classes:
        raise ValueError(f"{owner}.id2label has {len(names)} name{'' if len(names) == 1 else 's'} but num_classes "
                         f"is {num_classes}")
    if set(names) != set(range(num_classes)):
        stray = sorted(k for k in names if not 0 <= k < num_classes)
        raise ValueError(f"{owner}.id2label has class ids {stray[:5]} outside 0..{num_classes - 1}")
    return {k: names[k] for k in range(num_classes)}


class _ClassNames:
    """``id2label``/``label2id``/``class_names`` of a config with ``num_classes`` and ``id2label`` fields."""

    def _check_names(self) -> None:
        object.__setattr__(self, "id2label", check_id2label(self.id2label, self.num_classes, type(self).__name__))

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes' names in id order: ``id2label``'s, or "class 0", "class 1", ... without it."""
        if self.id2label is None:
            return tuple(f"class {k}" for k in range(self.num_classes))
        return tuple(self.id2label[k] for k in range(self.num_classes))

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: class id}`` of :attr:`class_names` (a name given twice maps to its first id)."""
        out: dict[str, int] = {}
        for k, name in enumerate(self.class_names):
            out.setdefault(name, k)
        return out

    def _names_for(self, overrides: dict) -> dict:
        """``overrides``, plus id2label=None when they change num_classes and leave names that no longer fit."""
        k = overrides.get("num_classes", self.num_classes)
        if "id2label" not in overrides and self.id2label is not None and k != self.num_classes:
            return {**overrides, "id2label": None}
        return overrides


@dataclass(frozen=True)
class LayerNormEps:
    """LayerNorm epsilons by role. Checkpoints disagree (see the weight loader), so they are data.

    The defaults are the NVlabs original: 1e-5 for the patch-embedding and spatial-reduction norms,
    1e-6 for the block and stage norms. Hugging Face uses 1e-5 everywhere, mmseg 1.x 1e-6 everywhere.
    """

    patch: float = 1e-5
    sr: float = 1e-5
    block: float = 1e-6
    stage: float = 1e-6


@dataclass(frozen=True)
class SegFormerConfig(_ClassNames):
    """Architecture of a SegFormer (MiT encoder + All-MLP decoder).

    All per-stage tuples have one entry per stage (4 for every published variant).
    ``id2label`` names the classes ({0: "wall", ...}, one per class, as Hugging Face's configs do;
    None: unnamed, "class 0", ...); ``label2id`` and ``class_names`` derive from it. A copy that
    changes ``num_classes`` without giving new names drops names that no longer fit.

    Example:
        >>> get_config("b0", num_classes=2, id2label={0: "background", 1: "road"}).label2id
        {'background': 0, 'road': 1}
    """

    name: str = "b0"
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    decoder_dim: int = 256
    num_classes: int = 150
    in_channels: int = 3
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    decoder_dropout: float = 0.1
    decoder_dropout2d: bool = False  # False: element-wise (Hugging Face); True: Dropout2d (NVlabs)
    ln_eps: LayerNormEps = LayerNormEps()
    id2label: dict[int, str] | None = field(default=None, hash=False)

    def __post_init__(self):
        n = len(self.hidden_sizes)
        for field in ("depths", "num_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratios"):
            value = getattr(self, field)
            if len(value) != n:
                raise ValueError(f"SegFormerConfig.{field} has {len(value)} entries, expected {n} (one per stage)")
        for i, (c, h) in enumerate(zip(self.hidden_sizes, self.num_heads)):
            if c % h:
                raise ValueError(f"stage {i}: hidden size {c} is not divisible by its {h} heads")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.decoder_dim < 1:
            raise ValueError(f"decoder_dim must be >= 1, got {self.decoder_dim}")
        self._check_names()

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(c // h for c, h in zip(self.hidden_sizes, self.num_heads))

    def replace(self, **overrides) -> "SegFormerConfig":
        """A copy with some fields changed; lists are turned into tuples, eps may be a dict."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown SegFormerConfig field(s) {unknown}; valid fields: {sorted(names)}")
        clean = {}
        for key, value in self._names_for(overrides).items():
            if isinstance(value, list):
                value = tuple(value)
            if key == "ln_eps" and isinstance(value, dict):
                value = dataclasses.replace(self.ln_eps, **value)
            clean[key] = value
        return dataclasses.replace(self, **clean)

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (``from_dict`` reads it back, id2label's string keys included)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SegFormerConfig":
        data = dict(data)
        eps = data.pop("ln_eps", None)
        cfg = cls().replace(**data)
        if eps is not None:
            cfg = cfg.replace(ln_eps=LayerNormEps(**eps))
        return cfg


_B1_B5_SIZES = (64, 128, 320, 512)

SEGFORMER_VARIANTS: dict[str, SegFormerConfig] = {
    "b0": SegFormerConfig(name="b0", hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "b1": SegFormerConfig(name="b1", hidden_sizes=_B1_B5_SIZES, depths=(2, 2, 2, 2), decoder_dim=256),
    "b2": SegFormerConfig(name="b2", hidden_sizes=_B1_B5_SIZES, depths=(3, 4, 6, 3), decoder_dim=768),
    "b3": SegFormerConfig(name="b3", hidden_sizes=_B1_B5_SIZES, depths=(3, 4, 18, 3), decoder_dim=768),
    "b4": SegFormerConfig(name="b4", hidden_sizes=_B1_B5_SIZES, depths=(3, 8, 27, 3), decoder_dim=768),
    "b5": SegFormerConfig(name="b5", hidden_sizes=_B1_B5_SIZES, depths=(3, 6, 40, 3), decoder_dim=768),
}


def get_config(variant: str | SegFormerConfig, **overrides) -> SegFormerConfig:
    """The registered config for ``variant`` ("b0".."b5", case-insensitive), with overrides applied."""
    if isinstance(variant, SegFormerConfig):
        cfg = variant
    else:
        if not isinstance(variant, str):
            raise TypeError(f"variant must be a name like 'b0' or a SegFormerConfig, got {type(variant).__name__}")
        key = variant.lower().removeprefix("mit-").removeprefix("segformer-")
        if key not in SEGFORMER_VARIANTS:
            raise ValueError(f"unknown SegFormer variant {variant!r}; known: {sorted(SEGFORMER_VARIANTS)}")
        cfg = SEGFORMER_VARIANTS[key]
    return cfg.replace(**overrides) if overrides else cfg


# ----- SETR --------------------------------------------------------------------------------------

SETR_DECODERS = ("naive", "pup", "mla")
# The paper's layer choices on the 24-layer ViT-L, as fractions of the depth (1-based layer numbers):
# auxiliary heads of Naive/PUP on layers 10, 15, 20; MLA taps layers 6, 12, 18, 24.
_AUX_LAYERS_OF_24 = (10, 15, 20)
_MLA_LAYERS_OF_24 = (6, 12, 18, 24)


def _scaled_indices(depth: int, layers_of_24: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(0, min(depth - 1, round(depth * k / 24) - 1)) for k in layers_of_24)


@dataclass(frozen=True)
class SETRConfig(_ClassNames):
    """Architecture of a SETR (plain ViT encoder at 1/16 + Naive, PUP or MLA decoder).

    ``aux_layers`` (Naive/PUP auxiliary heads) and ``mla_layers`` (MLA taps) are 0-based block
    indices; None scales the paper's ViT-L choice (9, 14, 19) and (5, 11, 17, 23) to ``depth``.
    The encoder has no final LayerNorm: each head (or the MLA neck) normalises its own input, as
    mmsegmentation builds SETR (VisionTransformer with final_norm=False).
    ``id2label``, ``label2id`` and ``class_names`` name the classes as in :class:`SegFormerConfig`.
    """

    name: str = "vit-l16"
    decoder: str = "pup"
    img_size: int = 512
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: int = 4
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    drop_rate: float = 0.0  # dropout after the position embedding and in attention/MLP outputs
    drop_path_rate: float = 0.0  # mmseg's SETR configs use 0
    num_classes: int = 150
    head_channels: int = 256  # Naive/PUP conv width; the MLA neck width
    mla_head_channels: int = 128  # per-level width of the MLA head
    aux_layers: tuple[int, ...] | None = None
    mla_layers: tuple[int, ...] | None = None
    id2label: dict[int, str] | None = field(default=None, hash=False)

    def __post_init__(self):
        if self.decoder not in SETR_DECODERS:
            raise ValueError(f"unknown SETR decoder {self.decoder!r}; choose one of {SETR_DECODERS}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for field_name in ("img_size", "patch_size", "depth", "num_classes", "head_channels", "mla_head_channels"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"SETRConfig.{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for field_name in ("aux_layers", "mla_layers"):
            value = getattr(self, field_name)
            if value is not None and any(not 0 <= i < self.depth for i in value):
                raise ValueError(f"SETRConfig.{field_name}={value} has indices outside 0..{self.depth - 1}")
        if self.mla_layers is not None and len(self.mla_layers) != 4:
            raise ValueError(f"SETRConfig.mla_layers needs 4 block indices, got {self.mla_layers}")
        self._check_names()

    @property
    def grid_size(self) -> int:
        """Side of the position-embedding grid (img_size / patch_size)."""
        return self.img_size // self.patch_size

    @property
    def aux_indices(self) -> tuple[int, ...]:
        """Blocks whose outputs feed the auxiliary heads (Naive/PUP)."""
        return self.aux_layers if self.aux_layers is not None else _scaled_indices(self.depth, _AUX_LAYERS_OF_24)

    @property
    def mla_indices(self) -> tuple[int, ...]:
        """Blocks whose outputs feed the MLA neck."""
        return self.mla_layers if self.mla_layers is not None else _scaled_indices(self.depth, _MLA_LAYERS_OF_24)

    @property
    def uses_cls_token(self) -> bool:
        """Naive/PUP run a cls token through the encoder; MLA keeps the parameter but drops the
        token before the first block (mmseg's SETR-MLA builds its ViT with with_cls_token=False)."""
        return self.decoder != "mla"

    def replace(self, **overrides) -> "SETRConfig":
        """A copy with some fields changed; lists are turned into tuples."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown SETRConfig field(s) {unknown}; valid fields: {sorted(names)}")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in self._names_for(overrides).items()}
        return dataclasses.replace(self, **clean)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SETRConfig":
        return cls().replace(**data)


SETR_VARIANTS: dict[str, SETRConfig] = {
    "vit-l16": SETRConfig(name="vit-l16", embed_dim=1024, depth=24, num_heads=16),
    "vit-b16": SETRConfig(name="vit-b16", embed_dim=768, depth=12, num_heads=12),
}

# SETR models by name (the tools' --model): decoder and ViT encoder ("-b16": ViT-B/16, else the paper's ViT-L/16).
SETR_MODELS: dict[str, tuple[str, str]] = {f"setr-{d}{suffix}": (d, enc) for d in SETR_DECODERS
                                           for suffix, enc in (("", "vit-l16"), ("-b16", "vit-b16"))}

# Every --model name the tools take: SegFormer variants, then SETR models.
MODEL_CHOICES: tuple[str, ...] = tuple(sorted(SEGFORMER_VARIANTS) + sorted(SETR_MODELS))


def get_setr_config(variant: str | SETRConfig = "vit-l16", **overrides) -> SETRConfig:
    """The registered SETR encoder config (``"vit-l16"``, ``"vit-b16"``), with overrides applied."""
    if isinstance(variant, SETRConfig):
        cfg = variant
    else:
        if not isinstance(variant, str):
            raise TypeError(f"variant must be a name like 'vit-l16' or a SETRConfig, got {type(variant).__name__}")
        key = variant.lower()
        if key not in SETR_VARIANTS:
            raise ValueError(f"unknown SETR encoder variant {variant!r}; known: {sorted(SETR_VARIANTS)}")
        cfg = SETR_VARIANTS[key]
    return cfg.replace(**overrides) if overrides else cfg
