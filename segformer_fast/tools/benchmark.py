"""End-to-end timing of our SegFormer against the reference and Hugging Face, in one run.

Used by ``segformer-fast benchmark`` and by ``benchmarks/`` (pytest-benchmark). Providers:
``fast`` (our model, fastest available backend), ``reference`` (backend "torch"), ``hf``
(transformers' SegformerForSemanticSegmentation with the same weights), ``patched`` (that HF model
after ``segformer_fast.patch``), and with compile=True ``fast_compile``, ``hf_compile`` and
``patched_compile``. Timings interleave the providers round by round, so a ratio
compares runs made under the same machine load. With ``amp`` ("bf16", "fp16") every provider runs
under the same ``torch.autocast``; a training step under fp16 scales its loss with a GradScaler.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..configs import SETR_MODELS, get_config
from ..models.segformer import SegFormer
from ..utils.amp import amp_dtype, autocast
from ..utils.memory import SavedTensorRecorder

__all__ = ["BenchRow", "Provider", "hf_provider", "build_providers", "provider_step", "run_benchmark",
           "format_table"]


@dataclass
class Provider:
    name: str
    module: torch.nn.Module
    infer: Callable[[torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BenchRow:
    provider: str
    mode: str  # "inference" or "train"
    times_s: list[float]
    batch: int
    saved_bytes: int | None = None
    amp: str | None = None  # None: fp32, else the autocast dtype ("bf16", "fp16")

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s


def _ours(name: str, model: SegFormer) -> Provider:
    return Provider(name, model, model, lambda x, y: model.loss(model(x), y))


def hf_provider(name: str, model) -> Provider:
    """A provider for a transformers SegformerForSemanticSegmentation (patched or not): logits, its own loss."""
    return Provider(name, model, lambda x: model(pixel_values=x).logits, lambda x, y: model(pixel_values=x, labels=y).loss)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_providers(
    variant: str = "b0",
    num_classes: int = 150,
    backend: str = "auto",
    compile: bool = False,
    hf: bool = True,
    device: str = "cpu",
    seed: int = 0,
    names: tuple[str, ...] | None = None,
) -> dict[str, Provider]:
    """The models to compare, all carrying the same random weights (drop path and dropout kept).

    ``variant`` "b0".."b5" is a SegFormer; a name from ``SETR_MODELS`` ("setr-pup", "setr-mla-b16", ...)
    a SETR, compared as fast vs reference only (no Hugging Face SETR exists).
    """
    torch.manual_seed(seed)
    if variant in SETR_MODELS:
        return _setr_providers(variant, num_classes, backend, device, names)
    cfg = get_config(variant, num_classes=num_classes)
    reference = SegFormer(cfg, backend="torch").to(device)
    fast = SegFormer(cfg, backend=backend).to(device)
    fast.load_state_dict(reference.state_dict())
    out = {"fast": _ours("fast", fast), "reference": _ours("reference", reference)}
    if hf and have_transformers():
        from ..io.hf import to_hf

        from ..patch import patch

        hf_model = to_hf(reference)
        patched = patch(to_hf(reference), backend=backend)
        out["hf"] = hf_provider("hf", hf_model)
        out["patched"] = hf_provider("patched", patched)
        if compile:
            out["hf_compile"] = hf_provider("hf_compile", torch.compile(hf_model))
            out["patched_compile"] = hf_provider("patched_compile", torch.compile(patched))
    if compile:
        out["fast_compile"] = _ours("fast_compile", torch.compile(fast))
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out


def _setr_providers(name: str, num_classes: int, backend: str, device: str,
                    names: tuple[str, ...] | None) -> dict[str, Provider]:
    from ..models.setr import SETR
    from ..configs import get_setr_config

    decoder, encoder = SETR_MODELS[name]
    cfg = get_setr_config(encoder, decoder=decoder, num_classes=num_classes)
    reference = SETR(cfg, backend="torch").to(device)
    fast = SETR(cfg, backend=backend).to(device)
    fast.load_state_dict(reference.state_dict())
    out = {n: Provider(n, m, m, lambda x, y, m=m: m(x, y).loss) for n, m in (("fast", fast), ("reference", reference))}
    return out if names is None else {k: v for k, v in out.items() if k in names}


def provider_step(p: Provider, x: torch.Tensor, labels: torch.Tensor | None, amp: str | None = None,
                  scaler: torch.amp.GradScaler | None = None) -> None:
    """One inference (no grad) or, with ``labels``, one training step (zeroed gradients, forward + loss,
    backward; no optimizer step), forward and loss under ``amp``'s autocast ("bf16", "fp16", None: fp32).

    Args:
        x: images (B, 3, H, W); labels: (B, H, W) or None for inference.
        scaler: a ``torch.amp.GradScaler`` for fp16 training: the loss is scaled before backward, as a
            user's step does (never unscaled or updated here, since no optimizer steps).
    """
    if labels is None:
        with torch.no_grad(), autocast(x.device.type, amp):
            p.infer(x)
        return
    p.module.zero_grad(set_to_none=True)
    with autocast(x.device.type, amp):
        loss = p.loss(x, labels)
    (loss if scaler is None else scaler.scale(loss)).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(
    providers: dict[str, Provider],
    size: int | tuple[int, int] = 512,
    batch: int = 1,
    train: bool = False,
    warmup: int = 1,
    repeat: int = 3,
    progress: bool = True,
    seed: int = 0,
    amp: str | None = None,
) -> list[BenchRow]:
    """Time every provider on the same input, interleaved round by round.

    Args:
        amp: None (or "none") for fp32, "bf16" or "fp16": every provider's forward (and loss) runs under
            ``torch.autocast`` with that dtype; fp16 training steps scale the loss with a GradScaler
            (one per provider; no optimizer step, so it is never unscaled or updated).
    Returns one BenchRow per provider; in train mode each also carries the saved-activation bytes
    (what autograd keeps for backward over forward + loss under the same autocast, parameters excluded).

    Example:
        >>> rows = run_benchmark(build_providers("b0"), size=256, train=True, amp="bf16")
    """
    amp = None if amp_dtype(amp) is None else amp
    h, w = (size, size) if isinstance(size, int) else size
    device = next(next(iter(providers.values())).module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, h, w, generator=gen).to(device)
    labels = None
    if train:
        labels = torch.randint(0, _num_classes(providers), (batch, h, w), generator=gen).to(device)
    for p in providers.values():
        p.module.train(train)
    scalers = {name: torch.amp.GradScaler(device.type) if train and amp == "fp16" else None for name in providers}

    times: dict[str, list[float]] = {name: [] for name in providers}
    rounds = warmup + repeat
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds * len(providers), desc="benchmark", unit="run", leave=False)
    for r in range(rounds):
        for name, p in providers.items():
            _sync(device)
            t0 = time.perf_counter()
            provider_step(p, x, labels, amp, scalers[name])
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    rows = []
    for name, p in providers.items():
        saved = None
        if train:
            with SavedTensorRecorder(list(p.module.parameters()) + list(p.module.buffers())) as rec:
                with autocast(device.type, amp):
                    loss = p.loss(x, labels)
            del loss
            saved = rec.bytes
        rows.append(BenchRow(name, "train" if train else "inference", times[name], batch, saved, amp))
    return rows


def _num_classes(providers: dict[str, Provider]) -> int:
    for p in providers.values():
        cfg = getattr(p.module, "config", None)
        if hasattr(cfg, "num_classes"):
            return cfg.num_classes
        if hasattr(cfg, "num_labels"):
            return cfg.num_labels
    raise ValueError("cannot tell the number of classes")


def format_table(rows: list[BenchRow], baseline: str = "hf") -> str:
    """A text table: latency, images/s, speed-up vs ``baseline`` and vs reference, saved MiB.

    Without a ``baseline`` provider (SETR has no Hugging Face twin) the reference is the baseline
    and its column appears once.
    """
    by = {r.provider: r for r in rows}
    ref = by.get("reference")
    base = by.get(baseline) or ref
    bases = [base] if ref is None or ref is base else [base, ref]
    header = f"{'provider':<16}{'mode':<11}{'median ms':>11}{'images/s':>10}"
    header += "".join(f"{'vs ' + b.provider:>15}" for b in bases)
    show_mem = any(r.saved_bytes is not None for r in rows)
    if show_mem:
        header += f"{'saved MiB':>11}{'saved vs ' + base.provider:>20}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r.provider:<16}{r.mode:<11}{r.median_s * 1e3:>11.1f}{r.images_per_s:>10.2f}"
        line += "".join(f"{b.median_s / r.median_s:>14.2f}x" for b in bases)
        if show_mem:
            ratio = r.saved_bytes / base.saved_bytes if base.saved_bytes else float("nan")
            line += f"{r.saved_bytes / 2**20:>11.1f}{ratio:>19.2f}x"
        lines.append(line)
    return "\n".join(lines)
