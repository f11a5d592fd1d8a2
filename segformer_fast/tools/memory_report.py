"""``segformer-fast memory``: what a training forward keeps for backward, per component and memory mode.

Runs real training forwards (forward + loss, train mode, random weights and labels) of our model in
each memory mode ("save", "recompute", "checkpoint"), of the pure-PyTorch reference (backend
"torch") and, when transformers is installed, of Hugging Face's SegformerForSemanticSegmentation
with its default SDPA attention (the baseline of the ratios) and with eager attention, all with the
same weights. A saved-tensor hook records every tensor autograd keeps (storages counted once,
parameters and buffers excluded) and charges it to the component whose
forward was running when it was first saved: patch embed, attention, Mix-FFN, decoder, loss, or
"other" (block and stage LayerNorms, residual sums, and the inputs checkpointed regions keep).
Hugging Face's loss is computed the way its forward computes it (bilinear upsampling then
cross-entropy), outside its forward so that it can be attributed. With ``--amp bf16|fp16`` every
model's forward and loss run under the same ``torch.autocast``.

The largest square training size within ``--budget`` is an estimate from measured bytes: saved
bytes are measured at two sizes (``--size`` and half of it), fitted as a * P + q * P^2 for P pixels
(q: the attention matrices Hugging Face and the reference keep), and added to
16 bytes per parameter (fp32 weight, gradient and two AdamW moments). It leaves out what is not
kept between forward and backward (the transient workspace of the backward itself) and allocator
overhead, so the real limit is somewhat lower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..configs import MEMORY_MODES, SETR_MODELS
from ..utils.amp import amp_dtype, amp_name, autocast
from ..utils.memory import SavedTensorRecorder

__all__ = ["COMPONENTS", "MemoryRow", "measure_saved_bytes", "parse_bytes", "largest_square_size", "run_memory_command"]

COMPONENTS = ("patch embed", "attention", "Mix-FFN", "MLP", "decoder", "loss", "other")  # MLP: SETR's ViT MLP
MODES = MEMORY_MODES
OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
_MIN_FIT_SIDE = 64
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class _ComponentRecorder(SavedTensorRecorder):
    """SavedTensorRecorder that also notes which component first saved each storage."""

    def __init__(self, exclude):
        super().__init__(exclude)
        self.stack: list[str] = []
        self._owner: dict[tuple, str] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        super()._pack(t)
        key = (t.device.type, t.device.index, t.untyped_storage().data_ptr())
        if key in self._seen:
            self._owner.setdefault(key, self.stack[-1] if self.stack else "other")
        return t

    def by_component(self) -> dict[str, int]:
        out = dict.fromkeys(COMPONENTS, 0)
        for key, nbytes in self._seen.items():
            out[self._owner[key]] += nbytes
        return out


def _component_of(module: torch.nn.Module, path: str = "") -> str | None:
    """The component a module's forward belongs to, by class name (ours and Hugging Face 4.x / 5.x) or,
    for SETR, by its place in the model (``path``, as named_modules gives it)."""
    name = type(module).__name__
    if "PatchEmbed" in name or path == "encoder.patch_embed":
        return "patch embed"
    if name.endswith("Attention"):
        return "attention"
    if "MixFFN" in name or "MixMLP" in name:
        return "Mix-FFN"
    if name in ("Mlp", "FusedMlp"):
        return "MLP"
    if "Decode" in name or name.endswith("Decoder") or path.startswith(("decode_head", "neck", "aux_heads")):
        return "decoder"
    if name in ("ViTEncoder", "ViTBlock"):  # their own LayerNorms, residual sums, position embedding
        return "other"
    return None


def measure_saved_bytes(
    model: torch.nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    amp: str | None = None,
) -> dict[str, int]:
    """Bytes autograd keeps for backward over one training forward + loss, per component.

    Args:
        model: the module (set to train mode here); its parameters and buffers are not counted.
        forward: images (B, 3, H, W) -> logits (B, K, h, w).
        loss: (logits, labels (B, H, W)) -> scalar.
        amp: None (fp32), "bf16" or "fp16": forward and loss under ``torch.autocast`` with that dtype
            (its low-precision copies of the weights are saved tensors, so they count).
    Returns:
        {component: bytes} over COMPONENTS.
    """
    model.train()
    rec = _ComponentRecorder(list(model.parameters()) + list(model.buffers()))
    handles = []

    def leave(*_):  # a forward hook must return None, or it replaces the module's output
        rec.stack.pop()

    for path, m in model.named_modules():
        comp = _component_of(m, path)
        if comp is not None:
            handles.append(m.register_forward_pre_hook(lambda *_, c=comp: rec.stack.append(c)))
            handles.append(m.register_forward_hook(leave))
    try:
        with rec, autocast(images.device.type, amp):
            logits = forward(images)
            rec.stack.append("loss")
            out = loss(logits, labels)
            rec.stack.pop()
    finally:
        for h in handles:
            h.remove()
    del out, logits
    return rec.by_component()


@dataclass
class MemoryRow:
    """One model's measurement: per-component bytes at the requested size and the total at a second size."""

    name: str
    components: dict[str, int]
    total_small: int
    params: int
    sizes: tuple[int, int]  # (requested side, second side used for the fit)
    batch: int
    extra: dict = field(default_factory=dict)
    amp: str | None = None  # None: fp32, else the autocast dtype ("bf16", "fp16")

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def fit(self) -> tuple[float, float]:
        """(a, q) of saved bytes = a * P + q * P^2, P = side * side pixels, through the two measurements.

        The quadratic term is the attention matrices that Hugging Face and the reference keep (N x N / sr^2
        per head); a fit that comes out with q < 0 is replaced by the line through the larger measurement.
        """
        (s1, s2), y1, y2 = self.sizes, self.total, self.total_small
        p1, p2 = float(s1 * s1), float(s2 * s2)
        if p1 != p2:
            q = (y1 / p1 - y2 / p2) / (p1 - p2)
            if q >= 0:
                return y1 / p1 - q * p1, q
        return y1 / p1, 0.0


def largest_square_size(row: MemoryRow, budget: float, multiple: int = 32) -> int:
    """Largest side (a multiple of ``multiple``) whose estimated training memory fits ``budget`` bytes, 0 if none."""
    a, q = row.fit()
    room = budget - OPTIMIZER_BYTES_PER_PARAM * row.params
    if room <= 0:
        return 0
    pixels = room / a if q == 0 else (math.sqrt(a * a + 4 * q * room) - a) / (2 * q)
    return int(math.sqrt(pixels)) // multiple * multiple


def parse_bytes(text: str) -> float:
    """'16GiB', '16 GB', '8000MiB', '1.5g', '123' (bytes) -> bytes. GB is 10^9, GiB 2^30."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 16GiB, 16GB, 8000MiB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _setr_models(name: str, num_classes: int, backend: str, seed: int = 0) -> dict[str, tuple]:
    """SETR: name -> (module, forward, loss). The loss runs the model with the labels (its fused loss
    needs the heads' low-resolution logits), so ``forward`` only hands the images on."""
    from ..configs import get_setr_config
    from ..models.setr import SETR

    decoder, encoder = SETR_MODELS[name]
    torch.manual_seed(seed)
    cfg = get_setr_config(encoder, decoder=decoder, num_classes=num_classes)
    reference = SETR(cfg, backend="torch")
    out = {}
    for mode in MODES:
        model = SETR(cfg, backend=backend, memory=mode)
        model.load_state_dict(reference.state_dict())
        out[mode] = (model, lambda x: x, lambda x, y, m=model: m(x, y).loss)
    out["reference"] = (reference, lambda x: x, lambda x, y: reference(x, y).loss)
    return out


def _models(variant: str, num_classes: int, backend: str, hf: bool, seed: int = 0) -> dict[str, tuple]:
    """name -> (module, forward, loss), all with one set of random weights."""
    from .benchmark import have_transformers

    if variant in SETR_MODELS:
        return _setr_models(variant, num_classes, backend, seed)
    from ..configs import get_config
    from ..models.segformer import SegFormer, segformer_loss_reference

    torch.manual_seed(seed)
    cfg = get_config(variant, num_classes=num_classes)
    reference = SegFormer(cfg, backend="torch")
    out = {}
    for mode in MODES:
        model = SegFormer(cfg, backend=backend, memory=mode)
        model.load_state_dict(reference.state_dict())
        out[mode] = (model, model, model.loss)
    out["reference"] = (reference, reference, reference.loss)
    if hf and have_transformers():
        from ..io.hf import to_hf

        for impl in ("sdpa", "eager"):  # sdpa: Hugging Face's default, and the baseline of the ratios
            hf_model = to_hf(reference, attn_implementation=impl)
            out[f"hf {impl}"] = (hf_model, lambda x, m=hf_model: m(pixel_values=x).logits, segformer_loss_reference)
    return out


def measure_all(variant: str, size: int, batch: int, num_classes: int, backend: str, hf: bool,
                progress: Callable[[str], None] = lambda _: None, amp: str | None = None,
                device: str | torch.device = "cpu") -> list[MemoryRow]:
    """Measure every model at ``size`` and at half of it (for the size fit), each under ``amp``'s autocast
    (None or "none": fp32; "bf16", "fp16"), on ``device`` (whose kernels decide what is saved).

    Example:
        >>> rows = measure_all("b0", 128, 1, 150, "auto", hf=True, amp="bf16")
    """
    amp = None if amp_dtype(amp) is None else amp
    small = max(_MIN_FIT_SIDE, size // 2)
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for s in {size, small}:
        inputs[s] = (torch.randn(batch, 3, s, s, generator=gen).to(device),
                     torch.randint(0, num_classes, (batch, s, s), generator=gen).to(device))
    rows = []
    for name, (module, forward, loss) in _models(variant, num_classes, backend, hf).items():
        progress(name)
        module.to(device)
        comps = measure_saved_bytes(module, forward, loss, *inputs[size], amp=amp)
        total_small = sum(comps.values())
        if small != size:
            total_small = sum(measure_saved_bytes(module, forward, loss, *inputs[small], amp=amp).values())
        params = sum(p.numel() for p in module.parameters())
        rows.append(MemoryRow(name, comps, total_small, params, (size, small), batch, amp=amp))
    return rows


def format_report(rows: list[MemoryRow], variant: str, budget: float | None, budget_text: str) -> str:
    mib = 2**20
    by = {r.name: r for r in rows}
    base = by.get("hf sdpa") or by.get("hf eager") or by["reference"]
    size, small = rows[0].sizes
    batch = rows[0].batch
    lines = [f"{_title(variant)} {size}x{size}, batch {batch}, {amp_name(rows[0].amp)}: bytes autograd keeps for "
             f"backward over one training forward + loss (MiB; parameters excluded)"]
    head = f"{'component':<14}" + "".join(f"{r.name:>12}" for r in rows)
    lines += [head, "-" * len(head)]
    for comp in COMPONENTS:
        if comp != "other" and not any(r.components[comp] for r in rows):  # e.g. Mix-FFN in a SETR
            continue
        lines.append(f"{comp:<14}" + "".join(f"{r.components[comp] / mib:>12.1f}" for r in rows))
    lines.append("-" * len(head))
    lines.append(f"{'total':<14}" + "".join(f"{r.total / mib:>12.1f}" for r in rows))
    lines.append(f"{'vs ' + base.name:<14}" + "".join(f"{r.total / base.total:>11.1%} " for r in rows))
    lines.append("other = block and stage LayerNorms, residual sums, and the inputs kept by checkpointed regions"
                 + (" (SETR: also the position embedding)." if _is_setr(variant) else "."))
    if budget is None:
        return "\n".join(lines)
    lines.append("")
    lines.append(f"Largest square training size within {budget_text} at batch {batch} (estimate):")
    for r in rows:
        side = largest_square_size(r, budget)
        a, q = r.fit()
        fits = f"{side}x{side}" if side else "none"
        quad = f" + {q:.3g} B/pixel^2" if q else ""
        lines.append(f"  {r.name:<12}{fits:>12}   (fit: {a:.0f} B/pixel{quad})")
    params = rows[0].params
    lines.append(
        f"Method: saved bytes measured at {size}x{size} and {small}x{small}, fitted as a * P + q * P^2 (P pixels), plus "
        f"{OPTIMIZER_BYTES_PER_PARAM} bytes per parameter (fp32 weight, gradient, AdamW moments: "
        f"{OPTIMIZER_BYTES_PER_PARAM * params / mib:.0f} MiB for {params / 1e6:.1f}M parameters); rounded down to a "
        "multiple of 32. Not counted: the backward's transient workspace and allocator overhead, so the real "
        "limit is lower."
    )
    return "\n".join(lines)


def _is_setr(variant: str) -> bool:
    return variant in SETR_MODELS


def _title(variant: str) -> str:
    return variant.upper() if _is_setr(variant) else f"SegFormer-{variant.upper()}"


def run_memory_command(args) -> int:
    """``segformer-fast memory`` (its parser is in :mod:`segformer_fast.tools.cli`)."""
    from .runtime import apply_runtime_args, resolve_device

    budget = parse_bytes(args.budget) if args.budget else None
    if args.size < _MIN_FIT_SIDE:
        raise ValueError(f"--size must be at least {_MIN_FIT_SIDE}, got {args.size}")
    apply_runtime_args(args)
    device = resolve_device(args.device)
    print(f"measuring {_title(args.model)} at {args.size}x{args.size} and {max(_MIN_FIT_SIDE, args.size // 2)} "
          f"(batch {args.batch}, {args.num_classes} classes, backend {args.backend!r}, {amp_name(args.amp)}) "
          f"on {device} ...", flush=True)
    rows = measure_all(args.model, args.size, args.batch, args.num_classes, args.backend, hf=not args.no_hf,
                       progress=lambda name: print(f"  {name}", flush=True), amp=args.amp, device=device)
    print(format_report(rows, args.model, budget, args.budget))
    return 0


