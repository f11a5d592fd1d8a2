"""Roofline of every fused op at one model's training shapes, from the per-op cost models.

    python benchmarks/roofline.py [--model b2] [--image 1024] [--batch 8]
                                  [--out-dir benchmarks/results/roofline] [--check | --measure]

For each fused op with Triton kernels (and the ops built on them), forward and backward separately,
at the shapes one training step of the model calls it with (from ``segformer_fast.configs``; the
attention and the depthwise conv once per stage, summed over the stage's layers), this writes
``roofline_<model>_<image>_bf16.{json,md}``:

- the minimum: tensor-core GEMM flops, other flops (exp/erf priced as fp32 issue time, see
  segformer_fast/ops/cost.py), bytes with each input read once and each output written once;
- the H200 bound: max(min bytes / HBM, GEMM flops / tensor-core rate, other flops / fp32 rate);
- the kernels AS WRITTEN (``segformer_fast/ops/<op>/cost.py``, one part per launch: re-reads,
  fp32 scratch, torch glue, recomputation) and the time they predict at the same rates;
- predicted / bound, flagged when above :data:`FLAG_RATIO`.

``--check`` exits 1 when the committed files differ from what the models give now (CI:
tests/test_roofline.py). ``--measure`` (:func:`measure`) times the same calls on a GPU and writes
``*_measured.{json,md}`` with the measured time and the fraction of the bound achieved (also
benchmarks/gpu_bench.py ``--roofline``, after its cases).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from segformer_fast.configs import get_config  # noqa: E402
from segformer_fast.ops.cost import BF16, ERF_FLOPS, EXP_FLOPS, Cost  # noqa: E402

# H200 SXM HBM3e peak bandwidth, NVIDIA H200 datasheet (4.8 TB/s); a copy measured about 4.3 TB/s (../shared/GPU.md)
HBM_BYTES_PER_S = 4.8e12
# dense bf16 matmul measured on the lent H200 (../shared/GPU.md): about 790 TFLOP/s
GEMM_FLOPS_PER_S = 790e12
# fp32 non-tensor: 132 SMs x 128 FMA lanes x 2 flops x ~1.98 GHz, about 67 TFLOP/s (../shared/GPU.md)
FP32_FLOPS_PER_S = 67e12
FLAG_RATIO = 1.5  # predicted / bound above this is flagged
OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "roofline")
DTYPE = "bf16"


@dataclass(frozen=True)
class Call:
    """One op at one shape, called ``count`` times per training step (e.g. once per layer of a stage)."""

    op: str
    label: str
    count: int
    shapes: dict

    def cost(self, **variant) -> dict[str, Cost]:
        return _model(self.op)(**self.shapes, **variant)

    def variants(self) -> dict[str, dict]:
        """{label: keyword arguments} of the op's other modes (its cost module's VARIANTS), reported apart."""
        return getattr(importlib.import_module(f"segformer_fast.ops.{self.op}.cost"), "VARIANTS", {})


def _model(op: str) -> Callable[..., dict[str, Cost]]:
    return importlib.import_module(f"segformer_fast.ops.{op}.cost").roofline


MODELLED_OPS = ("sr_attention", "dwconv3x3_gelu", "mix_ffn", "upsample_sum", "all_mlp_decoder",
                "upsample_cross_entropy")


def _git_blob_sha1(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # what `git hash-object` prints


def stale_models(ops=MODELLED_OPS) -> list[str]:
    """One message per file a cost model describes (its ``MODELLED`` git blobs) that has changed since."""
    stale = []
    for op in ops:
        for name, sha in importlib.import_module(f"segformer_fast.ops.{op}.cost").MODELLED.items():
            rel = f"segformer_fast/ops/{op}/{name}"
            now = _git_blob_sha1(os.path.join(ROOT, rel))
            if now != sha:
                stale.append(f"{rel} changed since its cost model was written (modelled blob {sha[:10]}, now "
                             f"{now[:10]}): update segformer_fast/ops/{op}/cost.py and its MODELLED, then rerun "
                             "python benchmarks/roofline.py")
    return stale


def stage_sizes(cfg, image: int) -> list[int]:
    """Side of each stage's token map: the overlapping patch embeddings (kernel 2s-1, padding s//2) give ceil(H / s)."""
    res, sizes = image, []
    for s in cfg.strides:
        res = -(-res // s)
        sizes.append(res)
    return sizes


def segformer_calls(model: str = "b2", image: int = 1024, batch: int = 8, dtype_bytes: int = BF16) -> list[Call]:
    """The fused-op calls of one SegFormer training step (square images), shapes from the config registry."""
    from segformer_fast.ops.sr_attention.reduce import reduced_size

    cfg = get_config(model)
    sizes = stage_sizes(cfg, image)
    calls = []
    for i, (c, heads, sr, ratio, depth, s) in enumerate(zip(cfg.hidden_sizes, cfg.num_heads, cfg.sr_ratios,
                                                            cfg.mlp_ratios, cfg.depths, sizes)):
        hr, wr = reduced_size((s, s), sr) if sr > 1 else (s, s)
        tag = f"stage {i + 1} x{depth}"
        calls.append(Call("sr_attention", f"{tag}: N={s * s} M={hr * wr} C={c} h={heads}", depth,
                          dict(B=batch, N=s * s, M=hr * wr, C=c, heads=heads, dtype_bytes=dtype_bytes)))
        calls.append(Call("mix_ffn", f"{tag}: {s}x{s} C={c} hidden={c * ratio}", depth,
                          dict(B=batch, H=s, W=s, C=c, hidden=c * ratio, dtype_bytes=dtype_bytes)))
        calls.append(Call("dwconv3x3_gelu", f"{tag}: {s}x{s} C={c * ratio}", depth,
                          dict(B=batch, H=s, W=s, C=c * ratio, dtype_bytes=dtype_bytes)))
    D, H = cfg.decoder_dim, sizes[0]
    calls.append(Call("upsample_sum", f"D={D}, maps {'/'.join(map(str, sizes))} -> {H}x{H}", 1,
                      dict(B=batch, D=D, H=H, W=H, sizes=[(s, s) for s in sizes], dtype_bytes=dtype_bytes)))
    if cfg.decoder_dropout > 0 and cfg.decoder_dropout2d:
        raise ValueError(f"{model}: the decoder's cost model has element-wise dropout only, not Dropout2d")
    calls.append(Call("all_mlp_decoder", f"train, D={D} K={cfg.num_classes} dropout {cfg.decoder_dropout:g}", 1,
                      dict(B=batch, H=H, W=H, channels=list(cfg.hidden_sizes), sizes=[(s, s) for s in sizes], D=D,
                           K=cfg.num_classes, p=cfg.decoder_dropout, dtype_bytes=dtype_bytes)))
    calls.append(Call("upsample_cross_entropy", f"K={cfg.num_classes}, {H}x{H} -> {image}x{image}", 1,
                      dict(B=batch, h=H, w=H, K=cfg.num_classes, H=image, W=image, dtype_bytes=dtype_bytes)))
    return calls


def _times(gemm: float, other: float, nbytes: float) -> dict[str, float]:
    return {"bytes": nbytes / HBM_BYTES_PER_S * 1e3, "gemm": gemm / GEMM_FLOPS_PER_S * 1e3,
            "fp32": other / FP32_FLOPS_PER_S * 1e3}


def _limit(times: dict[str, float]) -> tuple[float, str]:
    by = max(times, key=times.get)
    return times[by], by


def _r(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def row(call: Call, direction: str, cost: Cost) -> dict[str, Any]:
    """One table row: the minimum, the bound, the kernels as written, the prediction, all over ``call.count`` calls."""
    cost = cost.scaled(call.count)
    bound_ms, bound_by = _limit(_times(cost.gemm_flops, cost.other_flops, cost.min_bytes))
    pred_ms, pred_by = _limit(_times(cost.kernel_gemm_flops, cost.kernel_other_flops, cost.kernel_bytes))
    part_ms = [_limit(_times(p.gemm_flops, p.other_flops, p.bytes))[0] for p in cost.parts]
    ratio = pred_ms / bound_ms
    return {
        "op": call.op, "direction": direction, "shape": call.label, "calls": call.count,
        "gemm_flops": _r(cost.gemm_flops), "other_flops": _r(cost.other_flops), "exps": _r(cost.exps),
        "min_bytes": _r(cost.min_bytes), "bound_ms": _r(bound_ms, 4), "bound_by": bound_by,
        "kernel_bytes": _r(cost.kernel_bytes), "kernel_gemm_flops": _r(cost.kernel_gemm_flops),
        "kernel_other_flops": _r(cost.kernel_other_flops), "predicted_ms": _r(pred_ms, 4), "predicted_by": pred_by,
        "launches_ms": _r(sum(part_ms), 4), "ratio": _r(ratio, 4), "flag": ratio > FLAG_RATIO, "notes": cost.notes,
        "parts": [{"name": p.name, "bytes": _r(p.bytes), "gemm_flops": _r(p.gemm_flops),
                   "other_flops": _r(p.other_flops),
                   "ms": _r(ms, 4), "note": p.note}
                  for p, ms in zip(cost.parts, part_ms)],
    }


def report(model: str = "b2", image: int = 1024, batch: int = 8) -> dict[str, Any]:
    """The whole roofline as a JSON-able dict (rows per call and direction, then per-op totals)."""
    rows, variant_rows = [], []
    for call in segformer_calls(model, image, batch):
        costs = call.cost()
        rows += [row(call, direction, costs[direction]) for direction in ("forward", "backward")]
        for label, kwargs in call.variants().items():
            costs = call.cost(**kwargs)
            variant_rows += [dict(row(call, direction, costs[direction]), variant=label)
                             for direction in ("forward", "backward")]
    totals = _totals(rows)
    default = {(t["op"], t["direction"]): t["predicted_ms"] for t in totals}
    variants = [dict(t, variant=label) for label in dict.fromkeys(r["variant"] for r in variant_rows)
                for t in _totals([r for r in variant_rows if r["variant"] == label])
                if t["predicted_ms"] != default[(t["op"], t["direction"])]]  # only what the mode changes
    return {
        "model": model, "image": image, "batch": batch, "dtype": DTYPE,
        "rates": {"hbm_bytes_per_s": HBM_BYTES_PER_S, "gemm_flops_per_s": GEMM_FLOPS_PER_S,
                  "fp32_flops_per_s": FP32_FLOPS_PER_S},
        "flag_ratio": FLAG_RATIO, "rows": rows, "totals": totals, "variants": variants,
    }


def _totals(rows: list[dict]) -> list[dict]:
    """Per op and direction: the rows summed over the calls of the step."""
    totals = []
    for op in dict.fromkeys(r["op"] for r in rows):
        for direction in ("forward", "backward"):
            sel = [r for r in rows if r["op"] == op and r["direction"] == direction]
            bound, pred = sum(r["bound_ms"] for r in sel), sum(r["predicted_ms"] for r in sel)
            by_part: dict[str, float] = {}
            for r in sel:
                for part in r["parts"]:
                    by_part[part["name"]] = by_part.get(part["name"], 0.0) + part["ms"]
            worst = max(by_part, key=by_part.get)
            totals.append({"op": op, "direction": direction, "bound_ms": _r(bound, 4), "predicted_ms": _r(pred, 4),
                           "launches_ms": _r(sum(r["launches_ms"] for r in sel), 4),
                           "largest_launch": worst, "largest_launch_ms": _r(by_part[worst], 4),
                           "ratio": _r(pred / bound, 4), "flag": pred / bound > FLAG_RATIO})
    return totals


def _g(x: float) -> str:
    return f"{x / 1e9:.3g}" if x else "0"


def markdown(data: dict, measured: bool = False) -> str:
    """The report as Markdown; ``measured``: rows carry measured_ms (from :func:`measure`)."""
    rates = data["rates"]
    flag = f"**>{data['flag_ratio']}**"
    lines = [
        f"# Roofline of the fused ops: SegFormer-{data['model'].upper()}, {data['image']}x{data['image']}, "
        f"batch {data['batch']}, {data['dtype']}, one training step",
        "",
        "Generated by `python benchmarks/roofline.py` from the cost models in `segformer_fast/ops/<op>/cost.py`: "
        "estimates on paper of the Triton kernels (the default GPU path after CUDA) and the torch glue as "
        "written, not measurements. "
        f"H200 rates: HBM {rates['hbm_bytes_per_s'] / 1e12:g} TB/s, dense bf16 GEMM "
        f"{rates['gemm_flops_per_s'] / 1e12:g} TFLOP/s, fp32 non-tensor {rates['fp32_flops_per_s'] / 1e12:g} "
        f"TFLOP/s; an exp counts {EXP_FLOPS} fp32 flops (SFU issue), an erf {ERF_FLOPS}. "
        "Bound = max(min bytes / HBM, GEMM flops / GEMM rate, other flops / fp32 rate); predicted = the same "
        "for the kernels as written (the sums of their parts' bytes and flops). Launches ms: each launch at its "
        "own limit, one after the other (a pass that is cheap next to the op's total can still cost time). "
        f"Flag: predicted / bound > {data['flag_ratio']}. mix_ffn includes its dwconv3x3_gelu and all_mlp_decoder "
        "its upsample_sum (forward twice, backward once), which also have rows of their own. "
        "Rows are summed over the calls (layers) of the step. GB = 1e9 bytes, GFLOP = 1e9 flops. "
        "After a kernel change: update its `cost.py` (and its MODELLED git blobs) and rerun the script, which "
        "names every model whose files changed since it was written; tests/test_roofline.py checks this file "
        "is current.",
        "",
        "## Per op",
        "",
        "| op | direction | bound ms | predicted ms | ratio | flag | launches ms | largest launch (ms) |"
        + (" measured ms | of bound |" if measured else ""),
        "|---|---|---:|---:|---:|---|---:|---|" + ("---:|---:|" if measured else ""),
    ]
    for t in data["totals"]:
        line = (f"| {t['op']} | {t['direction']} | {t['bound_ms']:.3f} | {t['predicted_ms']:.3f} | "
                f"{t['ratio']:.2f} | {flag if t['flag'] else ''} | {t['launches_ms']:.3f} | "
                f"`{t['largest_launch']}` ({t['largest_launch_ms']:.3f}) |")
        if measured:
            m = t.get("measured_ms")
            line += f" {m:.3f} | {t['bound_ms'] / m:.0%} |" if m else " | |"
        lines.append(line)
    if data.get("variants"):
        lines += ["", "## Other modes", "",
                  "An op's non-default modes (its cost module's VARIANTS), summed over the step as above, where "
                  "they differ from the default; not in the other tables.", "",
                  "| op | mode | direction | bound ms | predicted ms | ratio | flag | largest launch (ms) |",
                  "|---|---|---|---:|---:|---:|---|---|"]
        for t in data["variants"]:
            lines.append(f"| {t['op']} | {t['variant']} | {t['direction']} | {t['bound_ms']:.3f} | "
                         f"{t['predicted_ms']:.3f} | {t['ratio']:.2f} | {flag if t['flag'] else ''} | "
                         f"`{t['largest_launch']}` ({t['largest_launch_ms']:.3f}) |")
    lines += [
        "",
        "## Per call",
        "",
        "| op | dir | shape | calls | GEMM GFLOP | other GFLOP | G exps | min GB | bound ms (by) | as written GB | "
        "as written GEMM / other GFLOP | predicted ms (by) | ratio | flag | launches ms |"
        + (" measured ms | of bound |" if measured else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|" + ("---:|---:|" if measured else ""),
    ]
    for r in data["rows"]:
        line = (f"| {r['op']} | {r['direction'][:3]} | {r['shape']} | {r['calls']} | {_g(r['gemm_flops'])} | "
                f"{_g(r['other_flops'])} | {_g(r['exps'])} | {_g(r['min_bytes'])} | "
                f"{r['bound_ms']:.3f} ({r['bound_by']}) | "
                f"{_g(r['kernel_bytes'])} | {_g(r['kernel_gemm_flops'])} / {_g(r['kernel_other_flops'])} | "
                f"{r['predicted_ms']:.3f} ({r['predicted_by']}) | {r['ratio']:.2f} | {flag if r['flag'] else ''} | "
                f"{r['launches_ms']:.3f} |")
        if measured:
            m = r.get("measured_ms")
            line += f" {m:.3f} | {r['bound_ms'] / m:.0%} |" if m else f" {r.get('measure_error', '')} | |"
        lines.append(line)
    lines += ["", "## What the kernels as written do (parts per call row)", "",
              "| op | dir | shape | part | GB | GEMM / other GFLOP | ms alone | what is counted |",
              "|---|---|---|---|---:|---:|---:|---|"]
    for r in data["rows"]:
        for p in r["parts"]:
            lines.append(f"| {r['op']} | {r['direction'][:3]} | {r['shape']} | `{p['name']}` | {_g(p['bytes'])} | "
                         f"{_g(p['gemm_flops'])} / {_g(p['other_flops'])} | {p['ms']:.3f} | {p['note']} |")
    lines += ["", "## Minimum counted", ""]
    for op in dict.fromkeys(r["op"] for r in data["rows"]):
        for direction in ("forward", "backward"):
            note = next(r["notes"] for r in data["rows"] if r["op"] == op and r["direction"] == direction)
            lines.append(f"- {op} {direction}: {note}")
    return "\n".join(lines) + "\n"


def paths(model: str = "b2", image: int = 1024, out_dir: str = OUT_DIR) -> tuple[str, str]:
    stem = os.path.join(out_dir, f"roofline_{model}_{image}_{DTYPE}")
    return stem + ".json", stem + ".md"


def render(data: dict) -> tuple[str, str]:
    """(JSON text, Markdown text) exactly as written to disk."""
    return json.dumps(data, indent=1) + "\n", markdown(data)


# ---------------------------------------------------------------------------------------------
# measuring on a GPU


def _runners(call: Call, device, dtype) -> dict[str, Callable[[], Any]]:
    """{"forward": thunk, "backward": thunk} running the modelled Triton launches of ``call`` on ``device``."""
    import torch

    s = call.shapes
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    if call.op == "sr_attention":
        from segformer_fast.ops.sr_attention.triton_kernels import sr_attention_bwd_triton, sr_attention_fwd_triton

        B, N, M, C, h = s["B"], s["N"], s["M"], s["C"], s["heads"]
        q, k, v, do = t(B, N, C), t(B, M, C), t(B, M, C), t(B, N, C)
        scale = (C // h) ** -0.5
        o, lse = sr_attention_fwd_triton(q, k, v, h, scale)

        def bwd():  # the op's backward with O kept (memory="save", the default): Delta, dQ, then dK/dV
            return sr_attention_bwd_triton(do, q, k, v, o, lse, h, scale)

        return {"forward": lambda: sr_attention_fwd_triton(q, k, v, h, scale), "backward": bwd}
    if call.op == "dwconv3x3_gelu":
        from segformer_fast.ops.dwconv3x3_gelu.triton_kernels import dwconv3x3_gelu_bwd, dwconv3x3_gelu_fwd

        B, H, W, C = s["B"], s["H"], s["W"], s["C"]
        x, gy, w, b = t(B, H * W, C), t(B, H * W, C), t(C, 1, 3, 3, scale=0.3), t(C)
        return {"forward": lambda: dwconv3x3_gelu_fwd(x, (H, W), w, b),
                "backward": lambda: dwconv3x3_gelu_bwd(gy, x, (H, W), w, b)}
    if call.op == "mix_ffn":
        from segformer_fast.ops.mix_ffn.op import _op_backward as ffn_bwd, _op_forward as ffn_fwd

        B, H, W, C, hid = s["B"], s["H"], s["W"], s["C"], s["hidden"]
        x, gout = t(B, H * W, C), t(B, H * W, C)
        w1, b1, wc, bc = t(hid, C, scale=C**-0.5), t(hid), t(hid, 1, 3, 3, scale=0.3), t(hid)
        w2, b2 = t(C, hid, scale=hid**-0.5), t(C)
        args = (w1, b1, wc, bc, w2)
        _, hidden = ffn_fwd(x, w1, b1, wc, bc, w2, b2, H, W, "none", "triton", True)
        return {"forward": lambda: ffn_fwd(x, w1, b1, wc, bc, w2, b2, H, W, "none", "triton", True),
                "backward": lambda: ffn_bwd(gout, x, hidden, *args, True, H, W, "none", "triton")}
    if call.op == "upsample_sum":
        from segformer_fast.ops.upsample_sum.triton_kernels import upsample_sum_bwd_triton, upsample_sum_fwd_triton

        B, D, H, W = s["B"], s["D"], s["H"], s["W"]
        maps, grad = [t(B, h, w, D) for h, w in s["sizes"]], t(B, H, W, D)
        return {"forward": lambda: upsample_sum_fwd_triton(maps, H, W, None, None, False),
                "backward": lambda: upsample_sum_bwd_triton(grad, s["sizes"], [], None, None, False, False, False)}
    if call.op == "all_mlp_decoder":
        from segformer_fast.ops.all_mlp_decoder.op import all_mlp_decoder_train

        B, H, W, D, K = s["B"], s["H"], s["W"], s["D"], s["K"]
        feats = [t(B, c, h, w).requires_grad_() for c, (h, w) in zip(s["channels"], s["sizes"])]
        A = [t(D, c, scale=c**-0.5).requires_grad_() for c in s["channels"]]
        a = [t(D).requires_grad_() for _ in s["channels"]]
        bn = [torch.ones(D, device=device, requires_grad=True), torch.zeros(D, device=device, requires_grad=True)]
        wc, bc = t(K, D, scale=D**-0.5).requires_grad_(), t(K).requires_grad_()
        grad = t(B, K, H, W)

        def fwd():
            return all_mlp_decoder_train(feats, A, a, *bn, wc, bc, eps=1e-5, p=s["p"], backend="triton")[0]

        # autograd needs the forward's graph: backward is timed with its forward, the forward's time taken off
        return {"forward": fwd, "backward+forward": lambda: fwd().backward(grad)}
    if call.op == "upsample_cross_entropy":
        from segformer_fast.ops.upsample_cross_entropy.op import _op_backward as ce_bwd, _op_forward as ce_fwd

        B, h, w, K, H, W = s["B"], s["h"], s["w"], s["K"], s["H"], s["W"]
        x = t(B, h, w, K)
        labels = torch.randint(0, K, (B, H, W), generator=g).to(device)
        _, lse = ce_fwd(x, labels, None, 255, "mean", "triton")
        one = torch.ones((), device=device)
        return {"forward": lambda: ce_fwd(x, labels, None, 255, "mean", "triton"),
                "backward": lambda: ce_bwd(one, x, labels, None, lse, 255, "mean", "triton")}
    raise ValueError(f"no runner for op {call.op!r}")


def time_ms(fn: Callable[[], Any], device, repeat: int, warmup: int) -> float:
    """Median of ``repeat`` timed calls of ``fn`` after ``warmup`` untimed ones (CUDA events on a GPU), in ms."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(device="cuda", model: str = "b2", image: int = 1024, batch: int = 8, dtype=None,
            repeat: int = 10, warmup: int = 3, ops=None, deadline: float | None = None) -> dict[str, Any]:
    """:func:`report` plus, per row, the measured time of the modelled launches (median of ``repeat``,
    times the row's call count) and per op total, so ``bound_ms / measured_ms`` is the fraction of the
    bound achieved. A call that fails (e.g. out of memory) records its error and the rest go on.

    Args:
        device: a CUDA device (or "cpu" with TRITON_INTERPRET=1 at toy shapes, to exercise the code).
        model, image, batch: the shapes, as :func:`report`.
        dtype: the tensors' dtype (default bf16, the one the models price).
        ops: measure only these ops (default: all); the other rows carry no measured_ms.
        deadline: a ``time.perf_counter()`` value; calls not started by then are skipped (measure_error says so).
    Returns:
        The report dict with ``measured_ms`` in each row and total; :func:`markdown` with measured=True shows it.
    """
    import time

    import torch

    device = torch.device(device)
    dtype = dtype or torch.bfloat16
    data = report(model, image, batch)
    data["measured_on"] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    data["measured_dtype"] = str(dtype).replace("torch.", "")
    rows = iter(data["rows"])
    for call in segformer_calls(model, image, batch):
        if ops is not None and call.op not in ops:
            next(rows), next(rows)
            continue
        if deadline is not None and time.perf_counter() > deadline:
            for _ in ("forward", "backward"):
                next(rows)["measure_error"] = "skipped: time budget"
            continue
        try:
            run = _runners(call, device, dtype)
        except Exception as exc:  # noqa: BLE001 - recorded per row
            run, err = None, f"{type(exc).__name__}: {exc}"[:200]
        for direction in ("forward", "backward"):
            r = next(rows)
            if run is None:
                r["measure_error"] = err
                continue
            try:
                if direction in run:
                    ms = time_ms(run[direction], device, repeat, warmup)
                else:  # the backward timed with its forward
                    ms = (time_ms(run["backward+forward"], device, repeat, warmup)
                          - time_ms(run["forward"], device, repeat, warmup))
                r["measured_ms"] = _r(ms * call.count, 4)
            except Exception as exc:  # noqa: BLE001 - recorded per row
                r["measure_error"] = f"{type(exc).__name__}: {exc}"[:200]
        run = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for t in data["totals"]:
        sel = [r for r in data["rows"] if r["op"] == t["op"] and r["direction"] == t["direction"]]
        if all("measured_ms" in r for r in sel):
            t["measured_ms"] = _r(sum(r["measured_ms"] for r in sel), 4)
    return data


def write_measured(data: dict, out_dir: str) -> tuple[str, str]:
    """Writes :func:`measure`'s report as ``roofline_<model>_<image>_bf16_measured.{json,md}`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = (pth.replace(f"_{DTYPE}.", f"_{DTYPE}_measured.")
                          for pth in paths(data["model"], data["image"], out_dir))
    for pth, text in ((json_path, json.dumps(data, indent=1) + "\n"), (md_path, markdown(data, measured=True))):
        with open(pth, "w") as f:
            f.write(text)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="b2")
    p.add_argument("--image", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out-dir", default=OUT_DIR)
    p.add_argument("--check", action="store_true", help="exit 1 if the files on disk are not what the models give")
    p.add_argument("--measure", action="store_true",
                   help="on a GPU: also time every call (measure()) and write *_measured.{json,md}")
    args = p.parse_args(argv)
    for message in stale_models():
        print(f"warning: {message}", file=sys.stderr)
    if args.measure:
        write_measured(measure("cuda", args.model, args.image, args.batch), args.out_dir)
        return 0
    json_text, md_text = render(report(args.model, args.image, args.batch))
    json_path, md_path = paths(args.model, args.image, args.out_dir)
    if args.check:
        stale = [pth for pth, text in ((json_path, json_text), (md_path, md_text))
                 if not os.path.exists(pth) or open(pth).read() != text]
        for pth in stale:
            print(f"{pth} is not current: run python benchmarks/roofline.py", file=sys.stderr)
        return 1 if stale else 0
    os.makedirs(args.out_dir, exist_ok=True)
    for pth, text in ((json_path, json_text), (md_path, md_text)):
        with open(pth, "w") as f:
            f.write(text)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
