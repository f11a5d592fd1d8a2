"""Model variants as data: one frozen dataclass per architecture and a registry of named variants."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["LayerNormEps", "SegFormerConfig", "SEGFORMER_VARIANTS", "get_config"]


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
class SegFormerConfig:
    """Architecture of a SegFormer (MiT encoder + All-MLP decoder).

    All per-stage tuples have one entry per stage (4 for every published variant).
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
        for key, value in overrides.items():
            if isinstance(value, list):
                value = tuple(value)
            if key == "ln_eps" and isinstance(value, dict):
                value = dataclasses.replace(self.ln_eps, **value)
            clean[key] = value
        return dataclasses.replace(self, **clean)

    def to_dict(self) -> dict:
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
