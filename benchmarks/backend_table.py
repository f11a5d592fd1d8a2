"""Auto's order on one GPU, measured: each op with more than one GPU implementation, timed per backend.

    python -m benchmarks.backend_table [--out DIR] [--model b2] [--image 1024] [--batch 8] [--budget SECONDS]

For every call of a SegFormer training step at the roofline's shapes (``benchmarks/roofline.py``:
B2 at 1024x1024, batch 8, bf16), each implementation of the op that runs on this device is timed
through the public op (autograd, as a model calls it): ``forward`` with no grad, ``train`` a forward
and a backward from a random output gradient. Times are medians of CUDA-event-timed repeats, summed
over the calls of the step (each call times its count of layers). The ops and implementations:

- ``sr_attention``: the whole layer with the CUDA patch gather and LayerNorm kernels against torch's ops
  (both around the attention core auto picks);
- ``sr_attention.core``: the Triton kernels against ATen's flash / memory-efficient attention;
- ``dwconv3x3_gelu``, ``upsample_sum``, ``upsample_cross_entropy``: Triton against the CUDA C++ kernels;
- ``mix_ffn`` with its conv on each of those two (only a Triton conv runs the fused Mix-FFN kernels).

An implementation that cannot run (not built, a condition it refuses, out of memory) records why and
the rest go on; an interrupt (the GPU check's time limit sends SIGINT) ends the table with what was
measured kept. ``order`` lists each op's implementations fastest first by train time (those that ran
every call), which is what an op's ``prefer_gpu`` table takes for this GPU's compute capability:
``GPU_PREFERENCE`` in dwconv3x3_gelu's (which mix_ffn follows), upsample_sum's, upsample_cross_entropy's and
sr_attention's op.py, ``CORE_GPU_PREFERENCE`` in sr_attention's for the attention core (with "torch" last).
Writes ``backend_table_<model>_<image>.{json,md}`` into ``--out``. On a CPU (a test, at toy shapes)
the same code runs on Triton's interpreter and the CUDA stand-in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script or imported from tests: the repository root holds the benchmarks package
    sys.path.insert(0, ROOT)

from benchmarks.roofline import segformer_calls, time_ms  # noqa: E402
from segformer_fast.utils.atomic import atomic_write_text  # noqa: E402

GPU_OPS = {
    "sr_attention": ("cuda", "triton"),
    "sr_attention.core": ("triton", "aten"),
    "dwconv3x3_gelu": ("triton", "cuda"),
    "mix_ffn": ("triton", "cuda"),
    "upsample_sum": ("triton", "cuda"),
    "upsample_cross_entropy": ("triton", "cuda"),
}
# a roofline call's op -> the ops whose implementations are timed at its shapes
_CALL_OPS = {"sr_attention": ("sr_attention", "sr_attention.core")}


def _runner(op: str, backend: str, shapes: dict, device: torch.device,
            dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    """{"forward": thunk, "train": thunk} calling ``op`` with ``backend`` at ``shapes`` (a roofline call's)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, scale=1.0, grad=False, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(grad)

    s = shapes
    if op == "sr_attention":  # the whole layer: the reduction, LayerNorm and projections around the core
        from segformer_fast.ops import sr_attention

        B, N, M, C, h = s["B"], s["N"], s["M"], s["C"], s["heads"]
        side, sr = int(round(N**0.5)), int(round((N / M) ** 0.5))
        x = t(B, N, C, grad=True)
        w = {f"{n}_weight": t(C, C, scale=C**-0.5, grad=True) for n in ("q", "k", "v", "proj")}
        w.update({f"{n}_bias": t(C, grad=True) for n in ("q", "k", "v", "proj")})
        if sr > 1:
            w.update(sr_weight=t(C, C, sr, sr, scale=(C * sr * sr) ** -0.5, grad=True), sr_bias=t(C, grad=True),
                     norm_weight=t(C, grad=True), norm_bias=t(C, grad=True))
        gy = t(B, N, C)

        def call():
            return sr_attention(x, (side, side), h, sr=sr, backend=backend, **w)

        return {"forward": call, "train": lambda: call().backward(gy)}
    if op == "sr_attention.core":
        from segformer_fast.ops.sr_attention.op import attention_core_bwd, attention_core_fwd

        B, N, M, C, h = s["B"], s["N"], s["M"], s["C"], s["heads"]
        q, k, v, do = t(B, N, C), t(B, M, C), t(B, M, C), t(B, N, C)
        scale = (C // h) ** -0.5

        def train():
            o, lse = attention_core_fwd(q, k, v, h, scale, core=backend)
            return attention_core_bwd(do, q, k, v, o, lse, h, scale, core=backend)

        return {"forward": lambda: attention_core_fwd(q, k, v, h, scale, core=backend), "train": train}
    if op in ("dwconv3x3_gelu", "mix_ffn"):
        from segformer_fast.ops import dwconv3x3_gelu, mix_ffn

        B, H, W, C = s["B"], s["H"], s["W"], s["C"]
        x = t(B, H * W, C, grad=True)
        if op == "dwconv3x3_gelu":
            w, b = t(C, 1, 3, 3, scale=0.3, grad=True), t(C, grad=True)

            def call():
                return dwconv3x3_gelu(x, (H, W), w, b, backend=backend)
        else:
            hid = s["hidden"]
            params = (t(hid, C, scale=C**-0.5, grad=True), t(hid, grad=True), t(hid, 1, 3, 3, scale=0.3, grad=True),
                      t(hid, grad=True), t(C, hid, scale=hid**-0.5, grad=True), t(C, grad=True))

            def call():
                return mix_ffn(x, (H, W), *params, backend=backend)
        gy = t(B, H * W, C)
        return {"forward": call, "train": lambda: call().backward(gy)}
    if op == "upsample_sum":
        from segformer_fast.ops import upsample_sum

        B, D, H, W = s["B"], s["D"], s["H"], s["W"]
        # channels-last maps, as the fused decoder makes them
        maps = [t(B, h, w, D).permute(0, 3, 1, 2).detach().requires_grad_() for h, w in s["sizes"]]
        gy = t(B, D, H, W)

        def call():
            return upsample_sum(maps, (H, W), backend=backend)

        return {"forward": call, "train": lambda: call().backward(gy)}
    if op == "upsample_cross_entropy":
        from segformer_fast.ops import upsample_cross_entropy

        B, h, w, K, H, W = s["B"], s["h"], s["w"], s["K"], s["H"], s["W"]
        # channels-last logits, as the fused decoder returns them
        x = t(B, h, w, K).permute(0, 3, 1, 2).detach().requires_grad_()
        labels = torch.randint(0, K, (B, H, W), generator=g).to(device)

        def call():
            return upsample_cross_entropy(x, labels, backend=backend)

        return {"forward": call, "train": lambda: call().backward()}
    raise ValueError(f"no runner for op {op!r}")


def _time_ms(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int, grad: bool) -> float:
    with torch.set_grad_enabled(grad):
        return time_ms(fn, device, repeat, warmup)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _resolves_to(op: str, backend: str, x: torch.Tensor, shapes: dict) -> str | None:
    """Why ``backend`` would not run ``op`` on x's device as asked (its own refusal), or None."""
    from segformer_fast.dispatch import get_spec

    spec = get_spec("dwconv3x3_gelu" if op == "mix_ffn" else op)
    facts = {"head_dim": shapes["C"] // shapes["heads"]} if op == "sr_attention.core" else {}
    try:
        got = spec.resolve(backend, x, use_env=False, **facts).backend
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return _error(exc)
    return None if got == backend else f"{backend!r} falls back to {got!r} here"


def measure(device="cuda", model: str = "b2", image: int = 1024, batch: int = 8, dtype=None, repeat: int = 5,
            warmup: int = 2, deadline: float | None = None, calls=None) -> dict[str, Any]:
    """Every (call, implementation) timed; see the module docstring. ``calls``: the roofline calls to time
    (default: :func:`benchmarks.roofline.segformer_calls` of model, image, batch)."""
    device = torch.device(device)
    dtype = dtype or torch.bfloat16
    rows, interrupted = [], False
    jobs = [(call, op) for call in (calls if calls is not None else segformer_calls(model, image, batch))
            for op in _CALL_OPS.get(call.op, (call.op,))]
    for call, op in jobs:
        for backend in GPU_OPS.get(op, ()):
            row = {"op": op, "shape": call.label, "calls": call.count, "backend": backend}
            rows.append(row)
            if interrupted or (deadline is not None and time.perf_counter() > deadline):
                row["error"] = "skipped: interrupted" if interrupted else "skipped: time budget"
                continue
            try:
                why = _resolves_to(op, backend, torch.empty(1, device=device, dtype=dtype), call.shapes)
                if why:
                    row["error"] = why
                    continue
                run = _runner(op, backend, call.shapes, device, dtype)
                for kind, grad in (("forward", False), ("train", True)):
                    row[f"{kind}_ms"] = round(_time_ms(run[kind], device, repeat, warmup, grad) * call.count, 4)
            except KeyboardInterrupt:  # a time limit's SIGINT: what was measured is still returned (and written)
                row["error"], interrupted = "interrupted", True
            except Exception as exc:  # noqa: BLE001 - recorded per row
                row["error"] = _error(exc)
            run = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    totals, order = {}, {}
    for op in dict.fromkeys(r["op"] for r in rows):
        per = {}
        for backend in GPU_OPS[op]:
            sel = [r for r in rows if r["op"] == op and r["backend"] == backend]
            if sel and all("train_ms" in r for r in sel):
                per[backend] = {k: round(sum(r[f"{k}_ms"] for r in sel), 4) for k in ("forward", "train")}
        totals[op] = per
        order[op] = sorted(per, key=lambda b: per[b]["train"])
    meta = {"model": model, "image": image, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            "torch": torch.__version__, "repeat": repeat, "interrupted": interrupted}
    return {"meta": meta, "rows": rows, "totals": totals, "order": order}


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# Implementations per op on {m['device']}: {m['model'].upper()} {m['image']}x{m['image']} batch "
             f"{m['batch']} {m['dtype']}, one training step", "",
             "Generated by `python -m benchmarks.backend_table`. Each op through its public function, forward "
             f"(no grad) and train (forward + backward), median of {m['repeat']} timed repeats (CUDA events on a "
             "GPU), summed over the step's calls. Order: fastest train time first "
             "(what the op's prefer_gpu table takes for compute capability "
             f"{tuple(m['capability']) if m['capability'] else 'n/a'}).", "",
             "| op | implementation | forward ms | train ms | order |", "|---|---|---:|---:|---|"]
    for op, per in data["totals"].items():
        for backend, t in per.items():
            lines.append(f"| {op} | {backend} | {t['forward']:.3f} | {t['train']:.3f} | "
                         f"{data['order'][op].index(backend) + 1} |")
    failed = [r for r in data["rows"] if "error" in r]
    if failed:
        lines += ["", "Not timed:", ""] + [f"- {r['op']} {r['backend']} ({r['shape']}): {r['error']}" for r in failed]
    lines += ["", "Per call:", "", "| op | shape | calls | implementation | forward ms | train ms |",
              "|---|---|---:|---|---:|---:|"]
    for r in data["rows"]:
        if "train_ms" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['calls']} | {r['backend']} | {r['forward_ms']:.3f} | "
                         f"{r['train_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def write(data: dict, out_dir: str) -> tuple[str, str]:
    """``backend_table_<model>_<image>.{json,md}`` in ``out_dir``, each written whole (temporary file, then renamed)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"backend_table_{data['meta']['model']}_{data['meta']['image']}")
    atomic_write_text(stem + ".json", json.dumps(data, indent=1) + "\n")
    atomic_write_text(stem + ".md", markdown(data))
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    return stem + ".json", stem + ".md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "gpu"))
    p.add_argument("--model", default="b2")
    p.add_argument("--image", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=None, help="seconds; calls not started by then are skipped")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("backend_table: needs a CUDA device", file=sys.stderr)
        return 2
    deadline = None if args.budget is None else time.perf_counter() + args.budget
    write(measure("cuda", args.model, args.image, args.batch, deadline=deadline), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
